//! File capabilities (`security.capability`, the kernel's `vfs_cap_data`)
//! as the text `setcap` reads, for the generated `postinst`.

/// Capability names by number, as libcap spells them.
const NAMES: [&str; 41] = [
    "cap_chown",
    "cap_dac_override",
    "cap_dac_read_search",
    "cap_fowner",
    "cap_fsetid",
    "cap_kill",
    "cap_setgid",
    "cap_setuid",
    "cap_setpcap",
    "cap_linux_immutable",
    "cap_net_bind_service",
    "cap_net_broadcast",
    "cap_net_admin",
    "cap_net_raw",
    "cap_ipc_lock",
    "cap_ipc_owner",
    "cap_sys_module",
    "cap_sys_rawio",
    "cap_sys_chroot",
    "cap_sys_ptrace",
    "cap_sys_pacct",
    "cap_sys_admin",
    "cap_sys_boot",
    "cap_sys_nice",
    "cap_sys_resource",
    "cap_sys_time",
    "cap_sys_tty_config",
    "cap_mknod",
    "cap_lease",
    "cap_audit_write",
    "cap_audit_control",
    "cap_setfcap",
    "cap_mac_override",
    "cap_mac_admin",
    "cap_syslog",
    "cap_wake_alarm",
    "cap_block_suspend",
    "cap_audit_read",
    "cap_perfmon",
    "cap_bpf",
    "cap_checkpoint_restore",
];

fn le32(b: &[u8], at: usize) -> Option<u64> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as u64)
}

/// The `setcap` text of a `security.capability` value (`cap_net_raw=ep`),
/// or `None` when it is not a valid `vfs_cap_data` (revision 1, 2 or 3).
pub fn to_text(value: &[u8]) -> Option<String> {
    let magic = le32(value, 0)?;
    let effective = magic & 1 == 1;
    let (words, len) = match magic & 0xff00_0000 {
        0x0100_0000 => (1, 12),
        0x0200_0000 => (2, 20),
        0x0300_0000 => (2, 24),
        _ => return None,
    };
    if value.len() != len {
        return None;
    }
    let (mut p, mut i) = (0u64, 0u64);
    for w in 0..words {
        p |= le32(value, 4 + 8 * w)? << (32 * w);
        i |= le32(value, 8 + 8 * w)? << (32 * w);
    }
    // Caps grouped by their flags, in the order libcap prints them.
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for bit in 0..64u32 {
        let (inp, ini) = (p >> bit & 1 == 1, i >> bit & 1 == 1);
        if !inp && !ini {
            continue;
        }
        let mut flags = String::new();
        if effective {
            flags.push('e');
        }
        if ini {
            flags.push('i');
        }
        if inp {
            flags.push('p');
        }
        let name = NAMES
            .get(bit as usize)
            .map(|n| n.to_string())
            .unwrap_or_else(|| bit.to_string());
        match groups.iter_mut().find(|(f, _)| *f == flags) {
            Some((_, names)) => names.push(name),
            None => groups.push((flags, vec![name])),
        }
    }
    if groups.is_empty() {
        return None;
    }
    Some(
        groups
            .into_iter()
            .map(|(f, n)| format!("{}={f}", n.join(",")))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_raw_effective_permitted() {
        // What `setcap cap_net_raw+ep` stores (revision 2).
        let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
        v.extend_from_slice(&(1u32 << 13).to_le_bytes());
        v.extend_from_slice(&[0; 12]);
        assert_eq!(to_text(&v).as_deref(), Some("cap_net_raw=ep"));
        assert_eq!(to_text(&v[..10]), None);
    }

    #[test]
    fn groups_by_flags_and_second_word() {
        let mut v = 0x0200_0000u32.to_le_bytes().to_vec();
        v.extend_from_slice(&3u32.to_le_bytes()); // chown, dac_override: p
        v.extend_from_slice(&1u32.to_le_bytes()); // chown: i
        v.extend_from_slice(&(1u32 << 7).to_le_bytes()); // 39: bpf, p
        v.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            to_text(&v).as_deref(),
            Some("cap_chown=ip cap_dac_override,cap_bpf=p")
        );
    }
}
