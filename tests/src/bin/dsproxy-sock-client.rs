//! The socket-level load balancing test client (see `sockclient`).
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(dsproxy_tests::sockclient::main(&args));
}
