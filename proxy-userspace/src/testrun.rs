//! `BPF_PROG_TEST_RUN` for the TC program: runs it on a crafted frame in
//! the kernel and returns the verdict and the frame as the program left it.
//! Used by the packet tests and the per-packet benchmarks.
use std::{io, os::fd::AsRawFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Result of one test run.
#[derive(Debug)]
pub struct Outcome {
    /// The program's return value (`TC_ACT_*`).
    pub verdict: i32,
    /// The frame after the program ran.
    pub frame: Vec<u8>,
    /// Mean run time per repetition, nanoseconds, as the kernel measured it.
    pub duration_ns: u32,
}

/// Run `prog` on `frame` `repeat` times (the kernel reuses one buffer, so
/// after a rewrite later repetitions see the rewritten frame).
pub fn run(prog: &impl AsRawFd, frame: &[u8], repeat: u32) -> io::Result<Outcome> {
    let mut out = vec![0u8; frame.len() + 512];
    let mut attr = TestAttr {
        prog_fd: u32::try_from(prog.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        data_size_in: u32::try_from(frame.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        data_size_out: u32::try_from(out.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..TestAttr::default()
    };
    // SAFETY: `attr` is a correctly laid out bpf_attr prefix that outlives
    // the call; the buffers it points to are live and sized as declared.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, std::mem::size_of::<TestAttr>()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(Outcome { verdict: attr.retval.cast_signed(), frame: out, duration_ns: attr.duration })
}
