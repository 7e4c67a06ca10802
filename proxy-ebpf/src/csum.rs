//! One's complement arithmetic (RFC 1071, incremental updates per RFC
//! 1624) for the checksums the datapath computes itself: the headers of
//! answers it builds, and the headers quoted inside ICMP errors, which the
//! kernel's checksum helpers do not know about.
//!
//! Words are read and written in native byte order: the one's complement
//! sum is byte-order independent (RFC 1071 2.B), so a checksum computed
//! over native words and stored natively is the right one on the wire.

use aya_ebpf::helpers::bpf_csum_diff;

/// A running one's complement sum of 16-bit words (wide enough that no
/// realistic number of additions overflows before the fold).
#[derive(Clone, Copy, Default)]
pub struct Sum(u64);

impl Sum {
    /// Add a 32-bit partial sum (as `bpf_csum_diff` returns one).
    #[inline(always)]
    pub fn add_wide(&mut self, sum: u32) {
        self.0 += u64::from(sum);
    }

    /// Add another sum.
    #[inline(always)]
    pub fn add(&mut self, other: Sum) {
        self.0 += other.0;
    }

    /// Account for the 16-bit word `old` becoming `new`.
    #[inline(always)]
    pub fn replace16(&mut self, old: [u8; 2], new: [u8; 2]) {
        self.0 += u64::from(!u16::from_ne_bytes(old));
        self.0 += u64::from(u16::from_ne_bytes(new));
    }

    /// Account for `old` becoming `new`, both of one length, a multiple of
    /// 4 (addresses), with `bpf_csum_diff`: one helper call instead of a
    /// load per word that the compiler would spill to the stack.
    #[inline(always)]
    pub fn replace(&mut self, old: &[u8], new: &[u8]) -> Result<(), ()> {
        if old.len() != new.len() || !old.len().is_multiple_of(4) {
            return Err(());
        }
        let n = u32::try_from(old.len()).map_err(|_| ())?;
        // SAFETY: both buffers are N readable bytes; the helper only reads
        // them (the pointers are mut in its signature only).
        let d = unsafe { bpf_csum_diff(old.as_ptr().cast_mut().cast(), n, new.as_ptr().cast_mut().cast(), n, 0) };
        // A negative return is an error; otherwise a 32-bit partial sum.
        let d = u32::try_from(d).map_err(|_| ())?;
        self.0 += u64::from(d);
        Ok(())
    }

    /// The sum folded to 16 bits.
    #[inline(always)]
    pub fn fold(self) -> u16 {
        let mut s = self.0;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        // Four folds bring any u64 to 16 bits.
        u16::try_from(s & 0xffff).unwrap_or(0)
    }

    /// As a difference for `bpf_l4_csum_replace(.., 0, diff, ..)`.
    #[inline(always)]
    pub fn as_diff(self) -> u64 {
        u64::from(self.fold())
    }
}

/// A checksum field `old` updated by the changes accumulated in `diff`.
#[inline(always)]
pub fn update(old: [u8; 2], diff: Sum) -> [u8; 2] {
    let mut s = Sum(u64::from(!u16::from_ne_bytes(old)));
    s.0 += u64::from(diff.fold());
    (!s.fold()).to_ne_bytes()
}
