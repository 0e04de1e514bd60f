//! Small helpers that several layers need and none owns: hex digests, file hashing, absolute
//! paths, this process's memory.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file as lowercase hex, streamed in 1 MiB reads.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// `p` joined to the current directory unless it is absolute; kept as written otherwise (no
/// components dropped), so paths derived from it read as the user wrote them.
pub fn absolute(p: &Path) -> std::io::Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

/// Resident memory of this process, from /proc (0 where unavailable).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessMemory {
    /// Resident now (VmRSS).
    pub resident_bytes: u64,
    /// Peak resident since start (VmHWM).
    pub peak_bytes: u64,
}

impl ProcessMemory {
    /// Reads /proc/self/status.
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        Self { resident_bytes: kib("VmRSS:"), peak_bytes: kib("VmHWM:") }
    }
}
