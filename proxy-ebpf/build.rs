//! Rebuild the eBPF object when bpf-linker changes (a new LLVM can change
//! the generated code even when the sources do not).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found: {err}; run `cargo xtask setup`"),
    }
}
