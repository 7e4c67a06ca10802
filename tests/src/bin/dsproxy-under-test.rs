//! The `dsproxy` agent, built inside the test package (see Cargo.toml).
fn main() -> anyhow::Result<()> {
    dsproxy::cli::main()
}
