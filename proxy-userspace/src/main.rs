//! `dsproxy`: the agent binary. Everything lives in the library (`dsproxy::cli`)
//! so that the integration tests can build the very same binary.
fn main() -> anyhow::Result<()> {
    dsproxy::cli::main()
}
