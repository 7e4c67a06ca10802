//! Deterministic pseudo-random numbers (xorshift64) for the randomised
//! tests: every run draws the same sequence, and no extra crate is needed.
pub struct XorShift(u64);

impl XorShift {
    /// A generator; any seed works (0 is replaced, xorshift needs a bit set).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
