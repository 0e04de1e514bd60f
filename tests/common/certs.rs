//! Throwaway certificates made with `openssl` for the TLS tests of the ledger
//! (tests/common/pg_cluster.rs) and of object stores (tests/buckets.rs): an authority, and
//! certificates it signs, as X.509 v3 with P-256 keys (rustls takes nothing older).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether `openssl` runs here.
pub fn available() -> bool {
    Command::new("openssl").arg("version").output().is_ok()
}

/// A certificate authority `name` in `dir`: its certificate `<name>.pem` (and key `<name>.key`).
pub fn authority(dir: &Path, name: &str) -> PathBuf {
    let (key, pem, subj) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN=deltadoc test {name}"));
    openssl(dir, &[&["req", "-x509"][..], &EC_KEY, &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]].concat());
    dir.join(pem)
}

/// A certificate `<name>.pem` for `subject` with the X.509 v3 `extensions`, signed by the
/// authority `ca.pem` of `dir` ([`authority`]), and its key `<name>.key`.
pub fn signed(dir: &Path, name: &str, subject: &str, extensions: &str) -> (PathBuf, PathBuf) {
    let (key, csr, pem, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
    std::fs::write(dir.join(&ext), format!("{extensions}\n")).unwrap();
    openssl(dir, &[&["req"][..], &EC_KEY, &["-keyout", &key, "-out", &csr, "-subj", subject]].concat());
    let ca = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
    openssl(dir, &[&["x509", "-req", "-in", &csr][..], &ca, &["-days", "2", "-extfile", &ext, "-out", &pem]].concat());
    (dir.join(pem), dir.join(key))
}

/// A server certificate for 127.0.0.1 signed by `ca` of `dir`.
pub fn localhost(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    signed(dir, name, "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
}

/// `openssl req` arguments for a new unencrypted P-256 key (fast to make, and rustls takes it).
const EC_KEY: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
