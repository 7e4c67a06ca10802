//! Many writes to one map in few system calls: `BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_DELETE_BATCH` (Linux 5.6), which aya 0.14 does not expose; and
//! `BPF_MAP_LOOKUP_BATCH` to read a whole array map (`array_values`).
//!
//! The kernel applies a batch element by element, in order, and stops at
//! the first element that fails, reporting how many it processed; each
//! element has the effect of the single `BPF_MAP_UPDATE_ELEM` /
//! `BPF_MAP_DELETE_ELEM` it replaces (`generic_map_update_batch`). So a
//! batch is a sequence of single operations: `update_all` and `delete_all`
//! resume after a failed element and report every failure by position.
//! A map type without batch support (`ENOTSUPP`, `EINVAL` before the first
//! element) is written one element at a time instead.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's internal "operation not supported" (not in libc).
const ENOTSUPP: i32 = 524;

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands (uapi `linux/bpf.h`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM` / `BPF_MAP_DELETE_ELEM`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a live, initialised `bpf_attr` prefix of the size
    // passed; the kernel reads it and writes back only within that size
    // (batch `count`). Every pointer inside it refers to arrays the caller
    // keeps alive for the duration of the call, of the element count given.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("file descriptors are not negative")
}

fn ptr<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}

/// One batch call on `keys` (and `values`, for updates): how many elements
/// the kernel processed, and the error that stopped it.
fn batch<K: Pod, V: Pod>(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
) -> (usize, io::Result<()>) {
    let mut attr = BatchAttr {
        keys: ptr(keys),
        values: values.map_or(0, ptr),
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: fd_u32(fd),
        ..BatchAttr::default()
    };
    let r = sys_bpf(cmd, &mut attr);
    (usize::try_from(attr.count).unwrap_or(0).min(keys.len()), r)
}

/// One single-element call.
fn single<K: Pod, V: Pod>(cmd: libc::c_long, fd: BorrowedFd<'_>, key: &K, value: Option<&V>) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd_u32(fd),
        key: std::ptr::from_ref(key) as u64,
        value: value.map_or(0, |v| std::ptr::from_ref(v) as u64),
        ..ElemAttr::default()
    };
    sys_bpf(cmd, &mut attr)
}

/// Does this error, before any element was processed, say that the map
/// type has no batch operation (rather than that the element failed)?
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ENOTSUPP | libc::EINVAL | libc::ENOSYS))
}

/// Apply `cmd` to every element, in order, in as few calls as possible.
/// `skip(e)` says a failure counts as done (a delete of a missing key).
/// Returns the failed elements by index.
fn all<K: Pod, V: Pod>(
    (batch_cmd, single_cmd): (libc::c_long, libc::c_long),
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: Option<&[V]>,
    skip: fn(&io::Error) -> bool,
) -> Vec<(usize, io::Error)> {
    let mut failed = Vec::new();
    let mut at = 0;
    let mut batched = true;
    while at < keys.len() {
        let result = if batched {
            let (done, r) = batch(batch_cmd, fd, &keys[at..], values.map(|v| &v[at..]));
            at += done;
            match r {
                Ok(()) => continue,
                Err(e) if done == 0 && unsupported(&e) => {
                    batched = false;
                    continue;
                }
                Err(e) if at >= keys.len() => {
                    // Every element was processed and the call still
                    // failed: nothing is known about a single element.
                    failed.push((keys.len() - 1, e));
                    break;
                }
                Err(e) => Err(e),
            }
        } else {
            single(single_cmd, fd, &keys[at], values.map(|v| &v[at]))
        };
        if let Err(e) = result
            && !skip(&e)
        {
            failed.push((at, e));
        }
        at += 1;
    }
    failed
}

/// Write `values[i]` at `keys[i]` for every `i` (`BPF_ANY`). Returns the
/// elements that failed, by index; the others landed.
pub fn update_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Vec<(usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    all((BPF_MAP_UPDATE_BATCH, BPF_MAP_UPDATE_ELEM), fd, keys, Some(values), |_| false)
}

/// Delete every key; a key already missing counts as deleted. Returns the
/// elements that failed, by index.
pub fn delete_all<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Vec<(usize, io::Error)> {
    all::<K, u8>((BPF_MAP_DELETE_BATCH, BPF_MAP_DELETE_ELEM), fd, keys, None, |e| {
        e.raw_os_error() == Some(libc::ENOENT)
    })
}

/// Every value of an array map (`u32` keys, `max_entries` of them), in
/// order, with `BPF_MAP_LOOKUP_BATCH`: one call per 4,096 elements instead
/// of one per element (a scrape of a 65,536-entry array took seconds in a
/// debug build). The batch token of an array is the next index.
pub fn array_values<V: Pod + Default + Clone>(fd: BorrowedFd<'_>, max_entries: u32) -> io::Result<Vec<V>> {
    const CHUNK: u32 = 4096;
    let mut out = Vec::with_capacity(max_entries as usize);
    let mut keys = vec![0u32; CHUNK as usize];
    let mut values = vec![V::default(); CHUNK as usize];
    let (mut next, mut first) = (0u32, true);
    loop {
        let from = next;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { std::ptr::from_ref(&from) as u64 },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd_u32(fd),
            ..BatchAttr::default()
        };
        let r = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = (attr.count as usize).min(values.len());
        out.extend_from_slice(&values[..n]);
        match r {
            // ENOENT: the end of the map was reached (with `n` more).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
            Ok(()) if n == 0 || out.len() >= max_entries as usize => return Ok(out),
            Ok(()) => first = false,
        }
    }
}
