# Shared pieces of the benchmark scripts (sourced, not run).

# gen DIR N: a tree of N entries, 98 files per directory, two levels deep.
gen() {
    python3 - "$1" "$2" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(root)
made = 0
d1 = 0
while made < n:
    top = os.path.join(root, f"d{d1:04d}")
    os.mkdir(top); made += 1
    for d2 in range(100):
        if made >= n: break
        sub = os.path.join(top, f"s{d2:02d}")
        os.mkdir(sub); made += 1
        for f in range(98):
            if made >= n: break
            with open(os.path.join(sub, f"f{f:02d}"), "w") as fh:
                fh.write(f"{d1}/{d2}/{f}\n")
            made += 1
    d1 += 1
PY
}

# install50 DIR [ROUND]: a 50-entry install: a new directory with 40 files,
# 4 rewrites (one with size and mtime restored) and 5 deletions. Each round
# touches other files, so several installs can run on one tree.
install50() {
    python3 - "$1" "${2:-0}" <<'PY'
import os, sys
r, rnd = sys.argv[1], int(sys.argv[2])
new = os.path.join(r, f"newpkg{rnd}")
os.makedirs(new)
for i in range(40):
    with open(os.path.join(new, f"n{i:02d}"), "w") as f: f.write("new\n")
victims = [os.path.join(r, "d0000", "s00", f"f{9 * rnd + i:02d}") for i in range(9)]
for v in victims[:3]:
    with open(v, "a") as f: f.write("changed\n")
st = os.stat(victims[3])
with open(victims[3], "r+") as f: f.write("X")
os.utime(victims[3], ns=(st.st_atime_ns, st.st_mtime_ns))
for v in victims[4:9]:
    os.remove(v)
PY
}

# measure CMD...: "seconds peak_KiB" of one run (needs $work); seconds to
# the millisecond from the wall clock, peak RSS from GNU time.
measure() {
    local t0 t1
    t0=$(date +%s%N)
    /usr/bin/time -o "$work/time.txt" -f '%M' "$@" >/dev/null 2>"$work/stderr.txt" || {
        echo "bench: failed: $*" >&2; cat "$work/stderr.txt" >&2; exit 1; }
    t1=$(date +%s%N)
    printf '%s %s\n' "$(python3 -c "print(f'{($t1 - $t0) / 1e9:.3f}')")" "$(tail -1 "$work/time.txt")"
}

# median3 CMD...: the run with the median time of three.
median3() { { measure "$@"; measure "$@"; measure "$@"; } | sort -n | sed -n 2p; }

ratio() { python3 -c "print(f'{float($1)/max(float($2),0.0005):.2f}')"; }
