//! Backend plugins: the C ABI between layerpack and a backend built as a
//! shared library, the host-side adapter ([`DynBackend`]) and the plugin
//! side ([`export_backend!`](crate::export_backend)).
//!
//! This is the only module besides the syscall wrappers that uses `unsafe`.
//!
//! # ABI version 2
//!
//! A plugin exports one function per major ABI version it implements,
//! `layerpack_backend_v2`, returning a pointer to a static [`TableV2`]. The
//! table starts with `abi_version` and `struct_size`; newer optional
//! functions are only ever appended, so a host detects them by
//! `struct_size`, and a table from an older plugin is still read up to its
//! own size. Incompatible changes get a new symbol (`_v3`).
//!
//! Version 2 (replacing 1, which this build refuses with a message naming
//! both versions): the backend's session state crosses as bytes (the JSON
//! of [`BackendState`], in [`FfiSpec::state`] and returned by `begin`);
//! `freeze`, `thaw` and `content_root` were added and `merged_path` was
//! dropped; every code (error kinds, file kinds, capabilities, probe and
//! health answers) is an explicit number listed here, never a position in
//! an array; results with several parts go through a [`TaggedSink`].
//!
//! Only `repr(C)` structs, integers, byte slices ([`Bytes`]: pointer +
//! length; paths are raw bytes) and opaque handles cross. Every function
//! returns 0 on success or -1 with an [`FfiError`] filled in; the plugin
//! owns the error's message and frees it in `free_error`. Results that are
//! bytes (a merged path, a reason) are handed to a host callback
//! ([`Sink`]) that copies them; changes are streamed one by one through a
//! [`ChangeSink`]. Every exported function catches panics and turns them
//! into an error, so a panicking plugin cannot unwind into the host.
//! Libraries are loaded once and never unloaded.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{c_void, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::backend::{
    BackendState, Begun, Capabilities, ChangeOptions, Health, LayerBackend, Probe, SessionSpec,
    Unavailable,
};
use crate::config::BackendConfig;
use crate::model::{Change, ChangeKind, ChangeSet, FileKind, Meta, RelPath};
use crate::registry::{Origin, Registry};
use crate::{Error, ErrorKind, Result};

/// The ABI version this build implements as a plugin.
pub const ABI_VERSION: u32 = 2;
/// The oldest ABI version this build loads.
pub const ABI_MIN: u32 = 2;
/// The newest ABI version this build loads.
pub const ABI_MAX: u32 = 2;
/// Versions above [`ABI_MAX`] looked for, to name them in the error.
const ABI_SCAN_LIMIT: u32 = 32;

/// A borrowed byte slice. Null with length 0 is the empty slice.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Bytes {
    /// First byte.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

impl Bytes {
    /// Borrow `b` for the duration of a call.
    pub const fn of(b: &[u8]) -> Bytes {
        Bytes {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that live for `'a` (or be
    /// null with any length, read as empty).
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// An error from the plugin: kind code and message, owned by the plugin
/// and released with `free_error`.
#[repr(C)]
#[derive(Debug)]
pub struct FfiError {
    /// [`ErrorKind`] code (see [`kind_code`]).
    pub kind: u32,
    /// UTF-8 message bytes (plugin-allocated).
    pub message: *mut u8,
    /// Message length.
    pub len: usize,
    /// Allocation capacity, for the plugin's `free_error`.
    pub capacity: usize,
}

impl FfiError {
    /// An empty error slot.
    pub const fn empty() -> FfiError {
        FfiError {
            kind: 0,
            message: std::ptr::null_mut(),
            len: 0,
            capacity: 0,
        }
    }
}

/// Receives one part of a result from the plugin (`tag` says which:
/// `TAG_*`); the host copies the bytes.
pub type TaggedSink = unsafe extern "C" fn(ctx: *mut c_void, tag: u32, bytes: Bytes);

/// [`TaggedSink`] tag: a path (the merged path of `begin`, `content_root`).
pub const TAG_PATH: u32 = 1;
/// [`TaggedSink`] tag: the JSON of a [`BackendState`] (from `begin`).
pub const TAG_STATE: u32 = 2;
/// [`TaggedSink`] tag: a sentence (why unavailable, what is unhealthy).
pub const TAG_TEXT: u32 = 3;

/// Receives one change; returns 0 to go on, anything else to stop.
pub type ChangeSink = unsafe extern "C" fn(ctx: *mut c_void, change: *const FfiChange) -> i32;

/// [`SessionSpec`] across the boundary.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiSpec {
    /// Package name (UTF-8).
    pub package: Bytes,
    /// Base path bytes.
    pub base: Bytes,
    /// Session directory path bytes.
    pub dir: Bytes,
    /// The JSON of the session's [`BackendState`] (`{}`-like empty state
    /// during `begin`).
    pub state: Bytes,
}

/// A backend's settings across the boundary: its table as TOML text and
/// where it came from, for error messages.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiConfig {
    /// Backend name (UTF-8).
    pub name: Bytes,
    /// The `[backends.<name>]` table as TOML text.
    pub toml: Bytes,
    /// Config file path bytes (empty: not from a file).
    pub origin_path: Bytes,
    /// Line of the table header in that file (0: unknown).
    pub origin_line: u64,
}

/// One extended attribute.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiXattr {
    /// Name bytes.
    pub name: Bytes,
    /// Value bytes.
    pub value: Bytes,
}

/// `FfiChange::flags`: `rdev_major`/`rdev_minor` are set.
pub const HAS_RDEV: u32 = 1;
/// `FfiChange::flags`: `link_target` is set.
pub const HAS_LINK_TARGET: u32 = 2;
/// `FfiChange::flags`: `sha256` is set.
pub const HAS_SHA256: u32 = 4;
/// `FfiChange::flags`: `link_group` is set.
pub const HAS_LINK_GROUP: u32 = 8;

/// One [`Change`] across the boundary, valid only during the callback.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiChange {
    /// Path relative to the base.
    pub path: Bytes,
    /// 0 added, 1 metadata modified, 2 content modified, 3 deleted.
    pub change: u32,
    /// File type code (see [`file_kind_code`]).
    pub file_kind: u32,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// `HAS_*` bits.
    pub flags: u32,
    /// Size.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Device major.
    pub rdev_major: u32,
    /// Device minor.
    pub rdev_minor: u32,
    /// Symlink target.
    pub link_target: Bytes,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// Hard-link group.
    pub link_group: u32,
    /// Extended attributes.
    pub xattrs: *const FfiXattr,
    /// Number of extended attributes.
    pub xattr_count: usize,
}

type Handle = *mut c_void;

/// The function table of ABI version 2. Fields are only ever appended.
#[repr(C)]
#[derive(Debug)]
pub struct TableV2 {
    /// Always 2 for this table.
    pub abi_version: u32,
    /// `size_of::<TableV2>()` as the plugin was built.
    pub struct_size: u32,
    /// The backend's name (UTF-8, static).
    pub name: Bytes,
    /// Build a backend from its settings.
    pub create:
        unsafe extern "C" fn(cfg: *const FfiConfig, out: *mut Handle, err: *mut FfiError) -> i32,
    /// Drop a backend made by `create`.
    pub destroy: unsafe extern "C" fn(h: Handle),
    /// Capability bits (`CAP_*`).
    pub capabilities: unsafe extern "C" fn(h: Handle, out: *mut u64, err: *mut FfiError) -> i32,
    /// `code` = 0 when available, else an [`Unavailable::code`] with the
    /// sentence sent as `TAG_TEXT`.
    pub probe: unsafe extern "C" fn(
        h: Handle,
        code: *mut u32,
        sink: TaggedSink,
        ctx: *mut c_void,
        err: *mut FfiError,
    ) -> i32,
    /// Open a session: the merged path as `TAG_PATH`, the state as
    /// `TAG_STATE`.
    pub begin: SpecSinkFn,
    /// Make the merged view unwritable.
    pub freeze: SpecFn,
    /// Make it writable again.
    pub thaw: SpecFn,
    /// Where the change set's entries are read once frozen, as `TAG_PATH`.
    pub content_root: SpecSinkFn,
    /// Stream the change set, in order, to `sink`. `opts` bit 0: hash all.
    pub changes: unsafe extern "C" fn(
        h: Handle,
        spec: *const FfiSpec,
        opts: u32,
        sink: ChangeSink,
        ctx: *mut c_void,
        err: *mut FfiError,
    ) -> i32,
    /// Fold the layer into the base.
    pub move_down: SpecFn,
    /// Drop the layer.
    pub discard: SpecFn,
    /// Release without folding or discarding.
    pub release: SpecFn,
    /// `code` = `HEALTH_OK`, `HEALTH_MOUNT_LOST` or `HEALTH_BROKEN`, with
    /// the sentence as `TAG_TEXT`.
    pub health: unsafe extern "C" fn(
        h: Handle,
        spec: *const FfiSpec,
        code: *mut u32,
        sink: TaggedSink,
        ctx: *mut c_void,
        err: *mut FfiError,
    ) -> i32,
    /// Free the message of an error this plugin filled in.
    pub free_error: unsafe extern "C" fn(err: *mut FfiError),
}

/// A call on a session that returns only success or an error.
pub type SpecFn = unsafe extern "C" fn(h: Handle, spec: *const FfiSpec, err: *mut FfiError) -> i32;

/// A call on a session that returns tagged bytes.
pub type SpecSinkFn = unsafe extern "C" fn(
    h: Handle,
    spec: *const FfiSpec,
    sink: TaggedSink,
    ctx: *mut c_void,
    err: *mut FfiError,
) -> i32;

/// `health` answer: intact.
pub const HEALTH_OK: u32 = 0;
/// `health` answer: [`Health::MountLost`].
pub const HEALTH_MOUNT_LOST: u32 = 1;
/// `health` answer: [`Health::Broken`].
pub const HEALTH_BROKEN: u32 = 2;

// SAFETY: the table is immutable static data: function pointers and a
// pointer to a static name.
unsafe impl Sync for TableV2 {}

/// The entry symbol of ABI version `v`.
pub fn entry_symbol(v: u32) -> String {
    format!("layerpack_backend_v{v}")
}

// ---------------------------------------------------------------------------
// Codes shared by both sides.

/// Stable code of an [`ErrorKind`].
pub fn kind_code(k: ErrorKind) -> u32 {
    match k {
        ErrorKind::NotFound => 1,
        ErrorKind::InvalidInput => 2,
        ErrorKind::Config => 3,
        ErrorKind::Unsupported => 4,
        ErrorKind::Busy => 5,
        ErrorKind::AlreadyOpen => 6,
        ErrorKind::Corrupt => 7,
        ErrorKind::Permission => 8,
        ErrorKind::Io => 9,
        ErrorKind::Plugin => 10,
    }
}

/// The [`ErrorKind`] of a code (unknown codes: `Plugin`).
pub fn kind_of(code: u32) -> ErrorKind {
    match code {
        1 => ErrorKind::NotFound,
        2 => ErrorKind::InvalidInput,
        3 => ErrorKind::Config,
        4 => ErrorKind::Unsupported,
        5 => ErrorKind::Busy,
        6 => ErrorKind::AlreadyOpen,
        7 => ErrorKind::Corrupt,
        8 => ErrorKind::Permission,
        9 => ErrorKind::Io,
        _ => ErrorKind::Plugin,
    }
}

/// Stable code of a [`FileKind`].
pub fn file_kind_code(k: FileKind) -> u32 {
    match k {
        FileKind::File => 1,
        FileKind::Dir => 2,
        FileKind::Symlink => 3,
        FileKind::CharDevice => 4,
        FileKind::BlockDevice => 5,
        FileKind::Fifo => 6,
        FileKind::Socket => 7,
    }
}

/// The [`FileKind`] of a code.
pub fn file_kind_of(code: u32) -> Option<FileKind> {
    Some(match code {
        1 => FileKind::File,
        2 => FileKind::Dir,
        3 => FileKind::Symlink,
        4 => FileKind::CharDevice,
        5 => FileKind::BlockDevice,
        6 => FileKind::Fifo,
        7 => FileKind::Socket,
        _ => return None,
    })
}

/// Capability bit: [`Capabilities::can_discard`].
pub const CAP_CAN_DISCARD: u64 = 1 << 0;
/// Capability bit: [`Capabilities::needs_root`].
pub const CAP_NEEDS_ROOT: u64 = 1 << 1;
/// Capability bit: [`Capabilities::online_move_down`].
pub const CAP_ONLINE_MOVE_DOWN: u64 = 1 << 2;
/// Capability bit: [`Capabilities::rootless`].
pub const CAP_ROOTLESS: u64 = 1 << 3;
/// Capability bit: [`Capabilities::in_place`].
pub const CAP_IN_PLACE: u64 = 1 << 4;
/// Capability bit: [`Capabilities::records_ownership`].
pub const CAP_RECORDS_OWNERSHIP: u64 = 1 << 5;
/// Capability bit: [`Capabilities::reserves_wh_names`].
pub const CAP_RESERVES_WH_NAMES: u64 = 1 << 6;

/// Capabilities as `CAP_*` bits; bits 32 to 47 carry
/// [`Capabilities::max_name_len`] (0: no limit of its own).
pub fn caps_to_bits(c: &Capabilities) -> u64 {
    let Capabilities {
        can_discard,
        needs_root,
        online_move_down,
        rootless,
        in_place,
        records_ownership,
        reserves_wh_names,
        max_name_len,
    } = *c;
    let limit = u64::from(max_name_len.unwrap_or(0)) << CAP_NAME_LEN_SHIFT;
    [
        (can_discard, CAP_CAN_DISCARD),
        (needs_root, CAP_NEEDS_ROOT),
        (online_move_down, CAP_ONLINE_MOVE_DOWN),
        (rootless, CAP_ROOTLESS),
        (in_place, CAP_IN_PLACE),
        (records_ownership, CAP_RECORDS_OWNERSHIP),
        (reserves_wh_names, CAP_RESERVES_WH_NAMES),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(limit, |acc, (_, bit)| acc | bit)
}

/// Where [`Capabilities::max_name_len`] sits in the capability word.
pub const CAP_NAME_LEN_SHIFT: u32 = 32;

/// The inverse of [`caps_to_bits`]; unknown bits are ignored.
pub fn caps_from_bits(b: u64) -> Capabilities {
    Capabilities {
        can_discard: b & CAP_CAN_DISCARD != 0,
        needs_root: b & CAP_NEEDS_ROOT != 0,
        online_move_down: b & CAP_ONLINE_MOVE_DOWN != 0,
        rootless: b & CAP_ROOTLESS != 0,
        in_place: b & CAP_IN_PLACE != 0,
        records_ownership: b & CAP_RECORDS_OWNERSHIP != 0,
        reserves_wh_names: b & CAP_RESERVES_WH_NAMES != 0,
        max_name_len: match (b >> CAP_NAME_LEN_SHIFT) & 0xffff {
            0 => None,
            n => Some(n as u16),
        },
    }
}

fn change_code(k: ChangeKind) -> u32 {
    match k {
        ChangeKind::Added => 0,
        ChangeKind::Modified {
            content_changed: false,
        } => 1,
        ChangeKind::Modified {
            content_changed: true,
        } => 2,
        ChangeKind::Deleted => 3,
    }
}

// ---------------------------------------------------------------------------
// Plugin side.

/// A backend that can be exported as a plugin with
/// [`export_backend!`](crate::export_backend).
pub trait PluginBackend: LayerBackend + Sized + 'static {
    /// The name it registers under (must not clash with a built-in).
    const NAME: &'static str;

    /// Build it from its `[backends.<NAME>]` settings.
    fn create(cfg: &BackendConfig) -> Result<Self>;
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

unsafe fn fill_error(err: *mut FfiError, kind: ErrorKind, message: String) {
    if err.is_null() {
        return;
    }
    let mut m = std::mem::ManuallyDrop::new(message.into_bytes());
    // SAFETY: the host passes a valid, exclusive error slot.
    unsafe {
        *err = FfiError {
            kind: kind_code(kind),
            message: m.as_mut_ptr(),
            len: m.len(),
            capacity: m.capacity(),
        };
    }
}

/// Run `f` for the exported function `what`: 0 on success; -1 with `err`
/// filled on an error or a panic.
fn guard(err: *mut FfiError, backend: &str, what: &str, f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            // SAFETY: `err` is the host's error slot for this call.
            unsafe { fill_error(err, e.kind(), e.to_string()) };
            -1
        }
        Err(p) => {
            let msg = format!(
                "plugin backend '{backend}' panicked in {what}: {}",
                panic_text(&*p)
            );
            // SAFETY: as above.
            unsafe { fill_error(err, ErrorKind::Plugin, msg) };
            -1
        }
    }
}

fn path_of(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

unsafe fn spec_in(spec: *const FfiSpec) -> Result<SessionSpec> {
    // SAFETY: the host passes a valid spec whose slices live for the call.
    let s = unsafe { &*spec };
    let package = String::from_utf8(unsafe { s.package.as_slice() }.to_vec())
        .map_err(|_| Error::new(ErrorKind::InvalidInput, "package name is not UTF-8"))?;
    let state = unsafe { s.state.as_slice() };
    let state = if state.is_empty() {
        BackendState::default()
    } else {
        serde_json::from_slice(state).map_err(|e| {
            Error::new(
                ErrorKind::Corrupt,
                format!("the session state passed to the plugin is not readable: {e}"),
            )
        })?
    };
    Ok(SessionSpec {
        package,
        base: path_of(unsafe { s.base.as_slice() }),
        dir: path_of(unsafe { s.dir.as_slice() }),
        state,
    })
}

unsafe fn config_in(cfg: *const FfiConfig) -> Result<BackendConfig> {
    // SAFETY: the host passes a valid config whose slices live for the call.
    let c = unsafe { &*cfg };
    let text = |b: Bytes| String::from_utf8_lossy(unsafe { b.as_slice() }).into_owned();
    let origin_path = unsafe { c.origin_path.as_slice() };
    BackendConfig::from_text(
        &text(c.name),
        &text(c.toml),
        (!origin_path.is_empty()).then(|| (path_of(origin_path), c.origin_line as usize)),
    )
}

unsafe fn backend<'a, T>(h: Handle) -> &'a T {
    // SAFETY: `h` came from `p_create::<T>` and has not been destroyed.
    unsafe { &*(h as *const T) }
}

fn send(sink: TaggedSink, ctx: *mut c_void, tag: u32, b: &[u8]) {
    // SAFETY: the host's sink copies the bytes during the call.
    unsafe { sink(ctx, tag, Bytes::of(b)) }
}

#[doc(hidden)]
pub unsafe extern "C" fn p_create<T: PluginBackend>(
    cfg: *const FfiConfig,
    out: *mut Handle,
    err: *mut FfiError,
) -> i32 {
    guard(err, T::NAME, "create", || {
        let cfg = unsafe { config_in(cfg) }?;
        let b = Box::new(T::create(&cfg)?);
        // SAFETY: `out` is the host's slot for the handle.
        unsafe { *out = Box::into_raw(b) as Handle };
        Ok(())
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn p_destroy<T: PluginBackend>(h: Handle) {
    if !h.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `h` came from `p_create::<T>`; the host destroys once.
            drop(unsafe { Box::from_raw(h as *mut T) })
        }));
    }
}

#[doc(hidden)]
pub unsafe extern "C" fn p_capabilities<T: PluginBackend>(
    h: Handle,
    out: *mut u64,
    err: *mut FfiError,
) -> i32 {
    guard(err, T::NAME, "capabilities", || {
        let bits = caps_to_bits(&unsafe { backend::<T>(h) }.capabilities());
        unsafe { *out = bits };
        Ok(())
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn p_probe<T: PluginBackend>(
    h: Handle,
    code: *mut u32,
    sink: TaggedSink,
    ctx: *mut c_void,
    err: *mut FfiError,
) -> i32 {
    guard(err, T::NAME, "probe", || {
        let c = match unsafe { backend::<T>(h) }.probe() {
            Probe::Available => 0,
            Probe::Unavailable(u) => {
                send(sink, ctx, TAG_TEXT, u.to_string().as_bytes());
                u.code()
            }
        };
        unsafe { *code = c };
        Ok(())
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn p_begin<T: PluginBackend>(
    h: Handle,
    spec: *const FfiSpec,
    sink: TaggedSink,
    ctx: *mut c_void,
    err: *mut FfiError,
) -> i32 {
    guard(err, T::NAME, "begin", || {
        let spec = unsafe { spec_in(spec) }?;
        let begun = unsafe { backend::<T>(h) }.begin(&spec)?;
        let state = serde_json::to_vec(&begun.state)
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot encode state: {e}")))?;
        send(sink, ctx, TAG_PATH, begun.merged.as_os_str().as_bytes());
        send(sink, ctx, TAG_STATE, &state);
        Ok(())
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn p_content_root<T: PluginBackend>(
    h: Handle,
    spec: *const FfiSpec,
    sink: TaggedSink,
    ctx: *mut c_void,
    err: *mut FfiError,
) -> i32 {
    guard(err, T::NAME, "content_root", || {
        let spec = unsafe { spec_in(spec) }?;
        let p = unsafe { backend::<T>(h) }.content_root(&spec)?;
        send(sink, ctx, TAG_PATH, p.as_os_str().as_bytes());
        Ok(())
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn p_changes<T: PluginBackend>(
    h: Handle,
    spec: *const FfiSpec,
    opts: u32,
    sink: ChangeSink,
    ctx: *mut c_void,
    err: *mut FfiError,
) -> i32 {
    guard(err, T::NAME, "changes", || {
        let spec = unsafe { spec_in(spec) }?;
        let opts = ChangeOptions {
            hash_all: opts & 1 != 0,
        };
        let cs = unsafe { backend::<T>(h) }.changes(&spec, &opts)?;
        for c in &cs {
            let m = &c.meta;
            let xattrs: Vec<FfiXattr> = m
                .xattrs
                .iter()
                .map(|(k, v)| FfiXattr {
                    name: Bytes::of(k),
                    value: Bytes::of(v),
                })
                .collect();
            let mut flags = 0;
            let (major, minor) = m.rdev.unwrap_or((0, 0));
            flags |= if m.rdev.is_some() { HAS_RDEV } else { 0 };
            flags |= if m.link_target.is_some() {
                HAS_LINK_TARGET
            } else {
                0
            };
            flags |= if m.sha256.is_some() { HAS_SHA256 } else { 0 };
            flags |= if m.link_group.is_some() {
                HAS_LINK_GROUP
            } else {
                0
            };
            let fc = FfiChange {
                path: Bytes::of(c.path.as_bytes()),
                change: change_code(c.kind),
                file_kind: file_kind_code(m.kind),
                mode: m.mode,
                uid: m.uid,
                gid: m.gid,
                flags,
                size: m.size,
                mtime_ns: m.mtime_ns,
                rdev_major: major,
                rdev_minor: minor,
                link_target: Bytes::of(m.link_target.as_deref().unwrap_or(&[])),
                sha256: m.sha256.unwrap_or([0; 32]),
                link_group: m.link_group.unwrap_or(0),
                xattrs: xattrs.as_ptr(),
                xattr_count: xattrs.len(),
            };
            // SAFETY: `fc` and what it points to live across the call.
            if unsafe { sink(ctx, &fc) } != 0 {
                return Err(Error::new(
                    ErrorKind::Plugin,
                    "the host stopped reading the change set",
                ));
            }
        }
        Ok(())
    })
}

macro_rules! plugin_spec_call {
    ($fn:ident, $method:ident) => {
        #[doc(hidden)]
        pub unsafe extern "C" fn $fn<T: PluginBackend>(
            h: Handle,
            spec: *const FfiSpec,
            err: *mut FfiError,
        ) -> i32 {
            guard(err, T::NAME, stringify!($method), || {
                let spec = unsafe { spec_in(spec) }?;
                unsafe { backend::<T>(h) }.$method(&spec)
            })
        }
    };
}
plugin_spec_call!(p_freeze, freeze);
plugin_spec_call!(p_thaw, thaw);
plugin_spec_call!(p_move_down, move_down);
plugin_spec_call!(p_discard, discard);
plugin_spec_call!(p_release, release);

#[doc(hidden)]
pub unsafe extern "C" fn p_health<T: PluginBackend>(
    h: Handle,
    spec: *const FfiSpec,
    code: *mut u32,
    sink: TaggedSink,
    ctx: *mut c_void,
    err: *mut FfiError,
) -> i32 {
    guard(err, T::NAME, "health", || {
        let spec = unsafe { spec_in(spec) }?;
        let c = match unsafe { backend::<T>(h) }.health(&spec) {
            Health::Ok => HEALTH_OK,
            Health::MountLost(why) => {
                send(sink, ctx, TAG_TEXT, why.as_bytes());
                HEALTH_MOUNT_LOST
            }
            Health::Broken(why) => {
                send(sink, ctx, TAG_TEXT, why.as_bytes());
                HEALTH_BROKEN
            }
        };
        unsafe { *code = c };
        Ok(())
    })
}

#[doc(hidden)]
pub unsafe extern "C" fn p_free_error(err: *mut FfiError) {
    if err.is_null() {
        return;
    }
    // SAFETY: the message was allocated by `fill_error` in this library
    // with this length and capacity, and is freed once.
    unsafe {
        let e = &mut *err;
        if !e.message.is_null() {
            drop(Vec::from_raw_parts(e.message, e.len, e.capacity));
        }
        e.message = std::ptr::null_mut();
        e.len = 0;
        e.capacity = 0;
    }
}

/// The table for `T` (used by [`export_backend!`](crate::export_backend)).
pub const fn table_v2<T: PluginBackend>() -> TableV2 {
    TableV2 {
        abi_version: 2,
        struct_size: std::mem::size_of::<TableV2>() as u32,
        name: Bytes::of(T::NAME.as_bytes()),
        create: p_create::<T>,
        destroy: p_destroy::<T>,
        capabilities: p_capabilities::<T>,
        probe: p_probe::<T>,
        begin: p_begin::<T>,
        freeze: p_freeze::<T>,
        thaw: p_thaw::<T>,
        content_root: p_content_root::<T>,
        changes: p_changes::<T>,
        move_down: p_move_down::<T>,
        discard: p_discard::<T>,
        release: p_release::<T>,
        health: p_health::<T>,
        free_error: p_free_error,
    }
}

/// Export a [`PluginBackend`] from a `cdylib` crate as a layerpack plugin:
/// `layerpack_core::export_backend!(MyBackend);` at the crate's top level.
/// It defines the entry symbol `layerpack_backend_v2`; the plugin author
/// writes no `unsafe`.
#[macro_export]
macro_rules! export_backend {
    ($ty:ty) => {
        /// Entry point of the layerpack backend plugin (ABI version 2).
        #[allow(unsafe_code)]
        #[no_mangle]
        pub extern "C" fn layerpack_backend_v2() -> *const $crate::plugin::TableV2 {
            static TABLE: $crate::plugin::TableV2 = $crate::plugin::table_v2::<$ty>();
            &TABLE
        }
    };
}

// ---------------------------------------------------------------------------
// Host side.

/// A loaded plugin library (never unloaded).
#[derive(Clone, Copy, Debug)]
pub struct PluginLibrary {
    /// The file, canonical.
    pub path: &'static Path,
    /// ABI version it implements.
    pub abi: u32,
    /// Backend name it exports.
    pub name: &'static str,
    table: &'static TableV2,
}

fn plugin_error(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Plugin,
        format!("plugin {}: {msg}", path.display()),
    )
}

/// Refuse, when running as root, a plugin file or any directory above it
/// that another user could write (a sticky directory is fine when the
/// entry in it belongs to root or the caller).
pub fn check_plugin_permissions(path: &Path) -> Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 {
        return Ok(());
    }
    let mut child_owner: Option<u32> = None;
    let mut cur = Some(path);
    while let Some(p) = cur {
        let md = std::fs::metadata(p).map_err(|e| Error::io(p, "cannot stat", e))?;
        let owner_ok = md.uid() == 0 || md.uid() == me;
        let writable_by_others = md.mode() & 0o022 != 0;
        let sticky_ok = md.is_dir()
            && md.mode() & 0o1000 != 0
            && child_owner.is_some_and(|o| o == 0 || o == me);
        if !owner_ok || (writable_by_others && !sticky_ok) {
            let what = if p == path {
                "the file"
            } else {
                "a directory above it"
            };
            return Err(plugin_error(
                path,
                format!(
                    "refused: {what} ({}) can be written by another user (owner uid {}, mode {:o}); a root process only loads plugins that root alone can change",
                    p.display(),
                    md.uid(),
                    md.mode() & 0o7777
                ),
            )
            .with_kind(ErrorKind::Permission));
        }
        child_owner = Some(md.uid());
        cur = p.parent().filter(|q| !q.as_os_str().is_empty());
    }
    Ok(())
}

fn loaded() -> &'static Mutex<HashMap<PathBuf, PluginLibrary>> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, PluginLibrary>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

type Entry = unsafe extern "C" fn() -> *const TableV2;

/// Load the plugin at `path` (once per process; later calls return the
/// same library).
pub fn load(path: &Path) -> Result<PluginLibrary> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            plugin_error(path, "no such file").with_kind(ErrorKind::NotFound)
        } else {
            Error::io(path, "cannot open plugin", e)
        }
    })?;
    let mut map = loaded().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(lib) = map.get(&canonical) {
        return Ok(*lib);
    }
    check_plugin_permissions(&canonical)?;
    // SAFETY: loading runs the library's initialisers. The file was named
    // in the config and passed the permission check above; that trust is
    // what a plugin system rests on.
    let lib = unsafe { libloading::Library::new(&canonical) }
        .map_err(|e| plugin_error(&canonical, format!("not a loadable shared library ({e})")))?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let find = |v: u32| -> Option<Entry> {
        let sym = format!("{}\0", entry_symbol(v));
        // SAFETY: the symbol is only called with the signature the ABI
        // defines for it.
        unsafe { lib.get::<Entry>(sym.as_bytes()) }.ok().map(|s| *s)
    };
    let Some((abi, entry)) = (ABI_MIN..=ABI_MAX)
        .rev()
        .find_map(|v| find(v).map(|e| (v, e)))
    else {
        let newer = (ABI_MAX + 1..=ABI_SCAN_LIMIT)
            .rev()
            .find(|v| find(*v).is_some());
        let older = (0..ABI_MIN).rev().find(|v| find(*v).is_some());
        let msg = match newer.or(older) {
            Some(v) => format!("implements ABI {v}; this build supports {ABI_MIN}..={ABI_MAX}"),
            None => format!(
                "does not export {} (build it as a cdylib with layerpack_core::export_backend!)",
                entry_symbol(ABI_MAX)
            ),
        };
        return Err(plugin_error(&canonical, msg));
    };
    // SAFETY: the entry function takes nothing and returns a pointer to a
    // static table (or null).
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(plugin_error(
            &canonical,
            "its entry point returned no table",
        ));
    }
    // SAFETY: read the two leading fields first, which every version has.
    let (version, size) = unsafe { ((*table).abi_version, (*table).struct_size) };
    if version != abi {
        return Err(plugin_error(
            &canonical,
            format!("{} returned a table for ABI {version}", entry_symbol(abi)),
        ));
    }
    let need = std::mem::size_of::<TableV2>() as u32;
    if size < need {
        return Err(plugin_error(
            &canonical,
            format!("its ABI {abi} table has {size} bytes; at least {need} are needed"),
        ));
    }
    // SAFETY: the table is static in a library that is never unloaded and
    // holds at least the fields of TableV2.
    let table: &'static TableV2 = unsafe { &*table };
    let name_bytes = unsafe { table.name.as_slice() };
    let name = std::str::from_utf8(name_bytes)
        .ok()
        .filter(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
        .ok_or_else(|| {
            plugin_error(
                &canonical,
                "its backend name must be non-empty ASCII letters, digits, '-' or '_'",
            )
        })?;
    let lib = PluginLibrary {
        path: Box::leak(canonical.clone().into_boxed_path()),
        abi,
        name: Box::leak(name.to_string().into_boxed_str()),
        table,
    };
    map.insert(canonical, lib);
    Ok(lib)
}

/// Load the plugin at `path` and register its backend. A name taken by a
/// built-in or another plugin is refused.
pub fn register_plugin(registry: &mut Registry, path: &Path) -> Result<PluginLibrary> {
    let lib = load(path)?;
    registry
        .register(
            lib.name,
            Origin::Plugin {
                path: lib.path.to_path_buf(),
                abi: lib.abi,
            },
            Box::new(move |cfg: &BackendConfig| {
                DynBackend::create(lib, cfg).map(|b| Box::new(b) as Box<dyn LayerBackend>)
            }),
        )
        .map_err(|e| plugin_error(lib.path, e).with_kind(ErrorKind::Config))?;
    Ok(lib)
}

/// A backend living in a plugin, behind the [`LayerBackend`] trait.
pub struct DynBackend {
    lib: PluginLibrary,
    handle: Handle,
    caps: Capabilities,
}

// SAFETY: plugin backends implement `LayerBackend`, which is `Send + Sync`
// (the ABI requires it of every table function); the handle is only used
// through that table.
unsafe impl Send for DynBackend {}
// SAFETY: as above.
unsafe impl Sync for DynBackend {}

/// What a [`TaggedSink`] received, by tag.
#[derive(Default)]
struct Tagged {
    parts: HashMap<u32, Vec<u8>>,
}

impl Tagged {
    fn take(&mut self, tag: u32) -> Vec<u8> {
        self.parts.remove(&tag).unwrap_or_default()
    }
}

unsafe extern "C" fn collect_tagged(ctx: *mut c_void, tag: u32, b: Bytes) {
    // SAFETY: `ctx` is the `Tagged` passed with this sink; `b` is valid
    // for the call.
    let out = unsafe { &mut *(ctx as *mut Tagged) };
    out.parts
        .entry(tag)
        .or_default()
        .extend_from_slice(unsafe { b.as_slice() });
}

struct ChangeCollector {
    changes: crate::model::ChangeSetBuilder,
    error: Option<Error>,
}

fn change_in(c: &FfiChange) -> std::result::Result<Change, String> {
    // SAFETY (for every `as_slice` here): the plugin keeps what `c` points
    // to alive during the callback.
    let raw = unsafe { c.path.as_slice() };
    let path = match RelPath::parse(raw) {
        Ok(p) if p.as_bytes() == raw => p,
        _ => {
            return Err(format!(
                "invalid path {:?} in the change set",
                String::from_utf8_lossy(raw)
            ))
        }
    };
    let kind = match c.change {
        0 => ChangeKind::Added,
        1 => ChangeKind::Modified {
            content_changed: false,
        },
        2 => ChangeKind::Modified {
            content_changed: true,
        },
        3 => ChangeKind::Deleted,
        n => return Err(format!("unknown change code {n}")),
    };
    let file_kind = file_kind_of(c.file_kind)
        .ok_or_else(|| format!("unknown file kind code {}", c.file_kind))?;
    let mut meta = Meta::new(file_kind, c.mode);
    meta.uid = c.uid;
    meta.gid = c.gid;
    meta.size = c.size;
    meta.mtime_ns = c.mtime_ns;
    meta.rdev = (c.flags & HAS_RDEV != 0).then_some((c.rdev_major, c.rdev_minor));
    meta.link_target =
        (c.flags & HAS_LINK_TARGET != 0).then(|| unsafe { c.link_target.as_slice() }.to_vec());
    meta.sha256 = (c.flags & HAS_SHA256 != 0).then_some(c.sha256);
    meta.link_group = (c.flags & HAS_LINK_GROUP != 0).then_some(c.link_group);
    if c.xattr_count > 0 && !c.xattrs.is_null() {
        // SAFETY: the plugin passes `xattr_count` records at `xattrs`.
        let xs = unsafe { std::slice::from_raw_parts(c.xattrs, c.xattr_count) };
        for x in xs {
            meta.xattrs.insert(
                unsafe { x.name.as_slice() }.to_vec(),
                unsafe { x.value.as_slice() }.to_vec(),
            );
        }
    }
    Ok(Change { path, kind, meta })
}

unsafe extern "C" fn collect_change(ctx: *mut c_void, c: *const FfiChange) -> i32 {
    // SAFETY: `ctx` is the collector passed with this sink; `c` is valid
    // for the call.
    let col = unsafe { &mut *(ctx as *mut ChangeCollector) };
    match catch_unwind(AssertUnwindSafe(|| change_in(unsafe { &*c }))) {
        Ok(Ok(ch)) => {
            col.changes.push(ch);
            0
        }
        Ok(Err(msg)) => {
            col.error = Some(Error::new(ErrorKind::Plugin, msg));
            1
        }
        Err(_) => {
            col.error = Some(Error::new(ErrorKind::Plugin, "cannot read a change"));
            1
        }
    }
}

struct SpecBuf {
    package: Vec<u8>,
    base: Vec<u8>,
    dir: Vec<u8>,
    state: Vec<u8>,
}

impl SpecBuf {
    fn new(s: &SessionSpec) -> SpecBuf {
        SpecBuf {
            package: s.package.as_bytes().to_vec(),
            base: s.base.as_os_str().as_bytes().to_vec(),
            dir: s.dir.as_os_str().as_bytes().to_vec(),
            state: serde_json::to_vec(&s.state).unwrap_or_default(),
        }
    }

    fn ffi(&self) -> FfiSpec {
        FfiSpec {
            package: Bytes::of(&self.package),
            base: Bytes::of(&self.base),
            dir: Bytes::of(&self.dir),
            state: Bytes::of(&self.state),
        }
    }
}

impl DynBackend {
    /// Create the plugin's backend from `cfg`.
    pub fn create(lib: PluginLibrary, cfg: &BackendConfig) -> Result<DynBackend> {
        let name = cfg.name.as_bytes().to_vec();
        let text = cfg.to_text().into_bytes();
        let origin = cfg
            .origin
            .as_ref()
            .map(|(p, _)| p.as_os_str().as_bytes().to_vec())
            .unwrap_or_default();
        let fc = FfiConfig {
            name: Bytes::of(&name),
            toml: Bytes::of(&text),
            origin_path: Bytes::of(&origin),
            origin_line: cfg.origin.as_ref().map_or(0, |(_, l)| *l as u64),
        };
        let mut handle: Handle = std::ptr::null_mut();
        call(lib, |err| unsafe {
            (lib.table.create)(&fc, &mut handle, err)
        })?;
        if handle.is_null() {
            return Err(plugin_error(lib.path, "create returned no backend"));
        }
        let mut b = DynBackend {
            lib,
            handle,
            caps: Capabilities::default(),
        };
        let mut bits = 0u64;
        call(lib, |err| unsafe {
            (lib.table.capabilities)(b.handle, &mut bits, err)
        })?;
        b.caps = caps_from_bits(bits);
        Ok(b)
    }

    /// The library this backend comes from.
    pub fn library(&self) -> PluginLibrary {
        self.lib
    }

    /// Call a function that answers with tagged bytes.
    fn tagged_call(&self, spec: &SessionSpec, f: SpecSinkFn) -> Result<Tagged> {
        let buf = SpecBuf::new(spec);
        let fs = buf.ffi();
        let mut out = Tagged::default();
        call(self.lib, |err| unsafe {
            f(
                self.handle,
                &fs,
                collect_tagged,
                &mut out as *mut Tagged as *mut c_void,
                err,
            )
        })?;
        Ok(out)
    }

    /// Call a function that answers a code and, with it, a sentence.
    fn code_call(
        &self,
        f: impl FnOnce(*mut u32, *mut c_void, *mut FfiError) -> i32,
    ) -> Result<(u32, String)> {
        let mut code = 0u32;
        let mut out = Tagged::default();
        call(self.lib, |err| {
            f(&mut code, &mut out as *mut Tagged as *mut c_void, err)
        })?;
        Ok((
            code,
            String::from_utf8_lossy(&out.take(TAG_TEXT)).into_owned(),
        ))
    }

    fn spec_call(&self, spec: &SessionSpec, f: SpecFn) -> Result<()> {
        let buf = SpecBuf::new(spec);
        let fs = buf.ffi();
        call(self.lib, |err| unsafe { f(self.handle, &fs, err) })
    }
}

/// Call into the plugin; turn a -1 into an [`Error`] and free the plugin's
/// message.
fn call(lib: PluginLibrary, f: impl FnOnce(*mut FfiError) -> i32) -> Result<()> {
    let mut err = FfiError::empty();
    if f(&mut err) == 0 {
        return Ok(());
    }
    // SAFETY: the plugin filled `err` with a message it owns.
    let msg = String::from_utf8_lossy(unsafe {
        Bytes {
            ptr: err.message,
            len: err.len,
        }
        .as_slice()
    })
    .into_owned();
    let kind = kind_of(err.kind);
    // SAFETY: freed once, by the library that allocated it.
    unsafe { (lib.table.free_error)(&mut err) };
    Err(Error::new(kind, msg))
}

impl Drop for DynBackend {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create` and is destroyed once.
        unsafe { (self.lib.table.destroy)(self.handle) };
    }
}

impl LayerBackend for DynBackend {
    fn name(&self) -> &str {
        self.lib.name
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn probe(&self) -> Probe {
        let answer = self.code_call(|code, ctx, err| unsafe {
            (self.lib.table.probe)(self.handle, code, collect_tagged, ctx, err)
        });
        match answer {
            Ok((0, _)) => Probe::Available,
            Ok((code, why)) => Probe::Unavailable(unavailable_of(code, why)),
            Err(e) => Probe::Unavailable(Unavailable::Other(e.to_string())),
        }
    }

    fn begin(&self, spec: &SessionSpec) -> Result<Begun> {
        let mut out = self.tagged_call(spec, self.lib.table.begin)?;
        let state = out.take(TAG_STATE);
        let state = serde_json::from_slice(&state).map_err(|e| {
            plugin_error(
                self.lib.path,
                format!("begin returned an unreadable state: {e}"),
            )
        })?;
        Ok(Begun {
            merged: path_of(&out.take(TAG_PATH)),
            state,
        })
    }

    fn freeze(&self, spec: &SessionSpec) -> Result<()> {
        self.spec_call(spec, self.lib.table.freeze)
    }

    fn thaw(&self, spec: &SessionSpec) -> Result<()> {
        self.spec_call(spec, self.lib.table.thaw)
    }

    fn content_root(&self, spec: &SessionSpec) -> Result<PathBuf> {
        let mut t = self.tagged_call(spec, self.lib.table.content_root)?;
        Ok(path_of(&t.take(TAG_PATH)))
    }

    fn changes(&self, spec: &SessionSpec, opts: &ChangeOptions) -> Result<ChangeSet> {
        let buf = SpecBuf::new(spec);
        let fs = buf.ffi();
        let mut col = ChangeCollector {
            changes: crate::model::ChangeSetBuilder::new(),
            error: None,
        };
        let r = call(self.lib, |err| unsafe {
            (self.lib.table.changes)(
                self.handle,
                &fs,
                u32::from(opts.hash_all),
                collect_change,
                &mut col as *mut ChangeCollector as *mut c_void,
                err,
            )
        });
        if let Some(e) = col.error {
            return Err(plugin_error(self.lib.path, e));
        }
        r?;
        Ok(col.changes.finish())
    }

    fn move_down(&self, spec: &SessionSpec) -> Result<()> {
        self.spec_call(spec, self.lib.table.move_down)
    }

    fn discard(&self, spec: &SessionSpec) -> Result<()> {
        self.spec_call(spec, self.lib.table.discard)
    }

    fn release(&self, spec: &SessionSpec) -> Result<()> {
        self.spec_call(spec, self.lib.table.release)
    }

    fn health(&self, spec: &SessionSpec) -> Health {
        let buf = SpecBuf::new(spec);
        let fs = buf.ffi();
        let answer = self.code_call(|code, ctx, err| unsafe {
            (self.lib.table.health)(self.handle, &fs, code, collect_tagged, ctx, err)
        });
        match answer {
            Ok((HEALTH_OK, _)) => Health::Ok,
            Ok((HEALTH_MOUNT_LOST, why)) => Health::MountLost(why),
            Ok((_, why)) => Health::Broken(why),
            Err(e) => Health::Broken(e.to_string()),
        }
    }
}

/// The [`Unavailable`] a plugin answered with `code` and sentence `why`:
/// the sentence is kept as the plugin wrote it.
fn unavailable_of(code: u32, why: String) -> Unavailable {
    match code {
        4 => Unavailable::NotImplemented,
        _ => Unavailable::Other(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 0..20 {
            let k = kind_of(code);
            if code != 0 && code <= 10 {
                assert_eq!(kind_code(k), code);
            } else {
                assert_eq!(k, ErrorKind::Plugin);
            }
        }
        for code in 1..=7 {
            assert_eq!(file_kind_code(file_kind_of(code).unwrap()), code);
        }
        assert_eq!(kind_of(999), ErrorKind::Plugin);
        let all = Capabilities {
            can_discard: true,
            needs_root: false,
            online_move_down: true,
            rootless: false,
            in_place: true,
            records_ownership: false,
            reserves_wh_names: true,
            max_name_len: Some(242),
        };
        assert_eq!(caps_from_bits(caps_to_bits(&all)), all);
        assert_eq!(caps_to_bits(&all), 1 | 4 | 16 | 64 | (242 << 32));
    }

    #[test]
    fn table_starts_with_version_and_size() {
        assert_eq!(std::mem::offset_of!(TableV2, abi_version), 0);
        assert_eq!(std::mem::offset_of!(TableV2, struct_size), 4);
    }
}
