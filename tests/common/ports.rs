//! Ports for the throwaway servers (`pg_cluster.rs`, `s3_server.rs`) that the tests stop and
//! start again on the same port. They lie outside the kernel's ephemeral range, where outgoing
//! connections take their local ports: a port freed by a stopped server could otherwise become
//! some connection's and keep the server from starting again ("address already in use"). Each
//! call of a process gets its own block, so a stopped server's ports are not handed to another.

use std::net::TcpListener;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU16, Ordering};

/// The first of `n` (at most 8) consecutive ports, free now and given to no other caller.
pub fn restartable(n: u16) -> u16 {
    assert!((1..=8).contains(&n), "blocks are of eight ports");
    static NEXT: OnceLock<AtomicU16> = OnceLock::new();
    let (first, blocks) = blocks();
    let next = NEXT.get_or_init(|| AtomicU16::new(random() % blocks));
    for _ in 0..blocks {
        let base = first + next.fetch_add(1, Ordering::Relaxed) % blocks * 8;
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports from {first} on");
}

/// The first port and the number of eight-port blocks outside the ephemeral range: below it,
/// or above it where too little lies below.
fn blocks() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
    let (low, high) = (bounds.next().unwrap_or(32_768), bounds.next().unwrap_or(60_999));
    let (first, blocks) = if low >= 12_000 {
        (10_000, (low - 10_000) / 8)
    } else {
        let first = high.saturating_add(1).max(10_000);
        (first, (u16::MAX - first) / 8)
    };
    assert!(blocks > 0, "no free ports outside the ephemeral range {low}-{high}");
    (first, blocks)
}

/// Where this process starts drawing, so that test binaries run one after another (or two
/// checkouts side by side) start apart.
fn random() -> u16 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (t ^ std::process::id().wrapping_mul(2_654_435_761)) as u16
}
