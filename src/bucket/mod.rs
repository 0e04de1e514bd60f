//! Buckets of S3-compatible object stores as inboxes, outputs and quarantines
//! (`docs/buckets.md`): `s3://bucket/prefix/` URLs, the stores that serve them, and the few
//! operations the daemon needs, each a blocking call (the daemon's threads are not async).
//!
//! Objects have neither renames nor appends, so what a folder gets from `rename` a bucket gets
//! from conditional requests: a result is created with `If-None-Match: *` (`PutMode::Create`)
//! and replaced only with `If-Match` on the version that was read, a download names the version
//! (ETag) it expects, and a source is deleted only after its copy is read back.
//!
//! Requests are retried by `object_store` a few times within seconds; a store that stays down
//! is the daemon's to wait for (`daemon/storage.rs`), and [`StoreError::waits`] says which
//! errors waiting can fix.

#[cfg(test)]
#[path = "../../tests/common/ports.rs"]
mod ports;
mod profile;
/// The integration tests' throwaway server, for the tests here and in `daemon/documents.rs`.
#[cfg(test)]
#[path = "../../tests/common/s3_server.rs"]
#[allow(dead_code)] // what only the integration tests use
mod s3_server;

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, UpdateVersion,
};
use sha2::{Digest, Sha256};

use crate::config::{Addressing, ObjectStoreConfig};

/// A place in a bucket: `s3://bucket/prefix/`. The prefix is empty or ends with `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketUrl {
    /// The bucket's name.
    pub bucket: String,
    /// Keys under it start with this.
    pub prefix: String,
}

impl BucketUrl {
    /// Whether `s` is meant as a bucket URL (and must then parse as one).
    pub fn is_url(s: &str) -> bool {
        s.contains("://")
    }

    /// Parses `s3://bucket/prefix`; a prefix without a trailing `/` gets one (a prefix names a
    /// folder-like place, never part of a name). Credentials in the URL are refused: they would
    /// end up in logs, results and metrics labels.
    pub fn parse(s: &str) -> Result<Self> {
        let Some(rest) = s.strip_prefix("s3://") else {
            bail!("{s:?}: only s3:// URLs are supported (S3 and S3-compatible stores: MinIO, SeaweedFS, Ceph, R2)");
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some((_, host)) = bucket.rsplit_once('@') {
            // Not repeated: what precedes the `@` is a secret.
            bail!(
                "s3://…@{host}/: credentials do not belong in the URL; they come from the AWS environment, profile or \
                 web identity (docs/buckets.md)"
            );
        }
        if bucket.contains(':') {
            bail!("{s:?}: a port does not belong in the URL; the endpoint goes in `object_store.endpoint` (docs/buckets.md)");
        }
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            bail!("{s:?}: {bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, '-' and '.')");
        }
        let prefix = prefix.trim_start_matches('/');
        if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
            bail!("{s:?}: the prefix may not have empty, '.' or '..' parts");
        }
        let prefix = if prefix.is_empty() || prefix.ends_with('/') { prefix.to_string() } else { format!("{prefix}/") };
        Ok(Self { bucket: bucket.to_string(), prefix })
    }

    /// The URL of a key of this bucket.
    pub fn object(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The key of `rel` under the prefix.
    pub fn key(&self, rel: &FsPath) -> String {
        format!("{}{}", self.prefix, rel.to_string_lossy())
    }

    /// Whether two places share keys (one's prefix holds the other's).
    pub fn overlaps(&self, other: &BucketUrl) -> bool {
        self.bucket == other.bucket && (self.prefix.starts_with(&other.prefix) || other.prefix.starts_with(&self.prefix))
    }

    /// The object `s3://bucket/key` names, when `url` is such a URL.
    pub fn split_object(url: &str) -> Option<(String, String)> {
        let rest = url.strip_prefix("s3://")?;
        let (bucket, key) = rest.split_once('/')?;
        Some((bucket.to_string(), key.to_string()))
    }
}

impl fmt::Display for BucketUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// What a request was doing (the `op` label of `deltadoc_object_store_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Listing an inbox.
    List,
    /// Reading an object.
    Get,
    /// Writing one.
    Put,
    /// Reading an object's size and version.
    Head,
    /// Deleting one.
    Delete,
}

impl Op {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::List => "list",
            Op::Get => "get",
            Op::Put => "put",
            Op::Head => "head",
            Op::Delete => "delete",
        }
    }

    /// Every value, to create the series at zero.
    pub const ALL: [Op; 5] = [Op::List, Op::Get, Op::Put, Op::Head, Op::Delete];
}

/// A request the store refused or never answered. Its message says the client's causes down
/// to the last (a certificate refused, a connection reset), each once: the client's messages
/// repeat some of their causes and leave others out.
#[derive(Debug, thiserror::Error)]
#[error("{url}: cannot {verb}: {causes}", verb = self.op.name(), causes = causes(&self.error))]
pub struct StoreError {
    /// What was asked.
    pub op: Op,
    /// The bucket URL or object it was asked of.
    pub url: String,
    error: object_store::Error,
}

impl StoreError {
    /// Whether waiting can fix it: the store is unreachable, overloaded or throttling (what
    /// `object_store` still sees after its own retries), or refuses the credentials (expired,
    /// not yet granted). A missing object or a failed condition is an answer, not an outage.
    pub fn waits(&self) -> bool {
        use object_store::Error as E;
        matches!(self.error, E::Generic { .. } | E::PermissionDenied { .. } | E::Unauthenticated { .. })
    }

    /// Whether the object is not there.
    pub fn not_found(&self) -> bool {
        matches!(self.error, object_store::Error::NotFound { .. })
    }
}

/// An object larger than a download may be.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {size} bytes or more, over the limit of {max} (limits.max_file_bytes)")]
pub struct OverLimit {
    url: String,
    size: u64,
    max: u64,
}

/// The buckets a store's event notification names: S3 and MinIO event records
/// (`Records[].s3.bucket.name`), or a SeaweedFS filer event (`key: /buckets/<name>/…`). `None`
/// when the body is neither: the caller then lists every bucket inbox. A notification only
/// makes the daemon list sooner, so nothing in it is trusted beyond the bucket's name.
pub fn notified_buckets(body: &[u8]) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(records) = v.get("Records").and_then(|r| r.as_array()) {
        let names = records.iter().filter_map(|r| r.pointer("/s3/bucket/name")?.as_str().map(str::to_string)).collect();
        return Some(names);
    }
    let key = v.get("key")?.as_str()?;
    let bucket = key.strip_prefix("/buckets/")?.split('/').next().filter(|b| !b.is_empty())?;
    Some(vec![bucket.to_string()])
}

/// `e` and its sources, each said once.
fn causes(e: &object_store::Error) -> String {
    let mut said = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !said.contains(&text) {
            said = format!("{said}: {text}");
        }
        cause = c.source();
    }
    said
}

/// One object of a listing.
#[derive(Clone, Debug)]
pub struct Listed {
    /// Its key.
    pub key: String,
    /// Bytes.
    pub size: u64,
    /// The version: ETag, and the version id on versioned buckets.
    pub version: String,
}

/// A bucket of a store, with the daemon's settings.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<AmazonS3>,
    /// The bucket's name.
    pub name: String,
}

/// The runtime every bucket request runs on: callers are plain threads (ingest, worker, the
/// readiness checks' blocking pool), and one HTTP connection pool serves them all.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("object-store")
            .enable_all()
            .build()
            .expect("the object store runtime starts (two threads, no I/O yet)")
    })
}

/// The buckets the configuration names, each built once with the daemon's settings.
pub struct Stores {
    cfg: ObjectStoreConfig,
    built: Mutex<HashMap<String, Bucket>>,
}

impl Stores {
    /// Holding `bucket` already (tests build it for a throwaway server).
    #[cfg(test)]
    pub(crate) fn seeded(bucket: Bucket) -> Self {
        let stores = Self::new(&ObjectStoreConfig::default());
        stores.built.lock().unwrap().insert(bucket.name.clone(), bucket);
        stores
    }

    /// With the daemon's `object_store` settings.
    pub fn new(cfg: &ObjectStoreConfig) -> Self {
        Self { cfg: cfg.clone(), built: Mutex::default() }
    }

    /// The bucket named `name`; `Err` names what in the settings or the AWS environment is wrong.
    pub fn bucket(&self, name: &str) -> Result<Bucket> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = built.get(name) {
            return Ok(b.clone());
        }
        let b = Bucket { store: Arc::new(build(&self.cfg, name)?), name: name.to_string() };
        built.insert(name.to_string(), b.clone());
        Ok(b)
    }
}

/// An S3 client for `bucket`: the AWS environment (`AWS_ACCESS_KEY_ID`, `AWS_SESSION_TOKEN`,
/// `AWS_WEB_IDENTITY_TOKEN_FILE` with `AWS_ROLE_ARN`, `AWS_ENDPOINT_URL`, `AWS_REGION`, …), then
/// the shared profile files for what the environment leaves out, then `object_store` settings.
fn build(cfg: &ObjectStoreConfig, bucket: &str) -> Result<AmazonS3> {
    // The rustls provider is chosen once per process; the ledger may have chosen the same.
    #[allow(deprecated)] // ring stays the provider: aws-lc-rs needs cmake (see Cargo.toml).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let profile = profile::Profile::load(&env)?;
    let endpoint = cfg
        .endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT"));
    let endpoint = endpoint.or_else(|| profile.as_ref().and_then(|p| p.endpoint.clone()));
    let region = cfg.region.clone().or_else(|| env("AWS_REGION")).or_else(|| env("AWS_DEFAULT_REGION"));
    let region = region.or_else(|| profile.as_ref().and_then(|p| p.region.clone())).unwrap_or_else(|| "us-east-1".into());
    let mut client = ClientOptions::new()
        .with_connect_timeout(cfg.timeout.0)
        .with_read_timeout(cfg.timeout.0)
        // A download of a large document takes as long as it takes; a silent one stops at the
        // read timeout.
        .with_timeout_disabled();
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            bail!("object_store.endpoint {e:?}: must start with https:// (or http:// for a server on a private network)");
        }
        // Plain HTTP only where the operator wrote it; certificates are always verified.
        client = client.with_allow_http(e.starts_with("http://"));
    }
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("object_store.ca_file {}: cannot read", ca.display()))?;
        let cert = object_store::Certificate::from_pem(&pem)
            .with_context(|| format!("object_store.ca_file {}: not a PEM certificate", ca.display()))?;
        client = client.with_root_certificate(cert);
    }
    let retry = RetryConfig {
        backoff: BackoffConfig { init_backoff: Duration::from_millis(200), max_backoff: Duration::from_secs(4), base: 2.0 },
        max_retries: 4,
        retry_timeout: cfg.timeout.0,
    };
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_client_options(client)
        .with_retry(retry)
        .with_virtual_hosted_style_request(cfg.addressing == Addressing::Virtual);
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    let from_env = ["AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"]
        .iter()
        .chain(&["AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_SKIP_SIGNATURE"])
        .any(|k| env(k).is_some());
    match profile {
        Some(p) if !from_env && p.has_credentials() => b = p.apply(b),
        _ if !from_env => tracing::info!(
            "s3://{bucket}/: no credentials in the environment (AWS_ACCESS_KEY_ID, AWS_WEB_IDENTITY_TOKEN_FILE) or an \
             AWS profile; asking the instance metadata service for the machine's role"
        ),
        _ => {}
    }
    b.build().with_context(|| format!("s3://{bucket}/: cannot set up the client"))
}

/// The version of an object as deltadoc tells versions apart: ETag, and the version id where
/// the bucket keeps versions.
fn version_of(meta: &ObjectMeta) -> String {
    match (&meta.e_tag, &meta.version) {
        (Some(e), Some(v)) => format!("{e}@{v}"),
        (Some(e), None) => e.clone(),
        (None, Some(v)) => format!("@{v}"),
        (None, None) => format!("{}@{}", meta.size, meta.last_modified.timestamp_millis()),
    }
}

/// The client's path of `key`: as listed (`Path::parse` keeps it exactly), else with the
/// characters the client does not send as they are encoded (a key deltadoc made from a file name).
fn path(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

impl Bucket {
    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.name)
    }

    fn err(&self, op: Op, key: &str, error: object_store::Error) -> StoreError {
        StoreError { op, url: self.url(key), error }
    }

    /// The listing of everything under `prefix`, page after page.
    fn listing(&self, prefix: &str) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let at = Path::from(prefix.trim_end_matches('/'));
        self.store.list(if prefix.is_empty() { None } else { Some(&at) })
    }

    /// Every object under `prefix`, all pages of the listing. Only complete objects are listed:
    /// S3 shows a multipart upload once it is completed, in one step.
    pub fn list(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        runtime().block_on(async {
            let mut out = Vec::new();
            let mut stream = self.listing(prefix);
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(|e| self.err(Op::List, prefix, e))?;
                out.push(Listed { key: meta.location.to_string(), size: meta.size, version: version_of(&meta) });
            }
            Ok(out)
        })
    }

    /// Whether the store answers a listing of `prefix` (one page).
    pub fn reachable(&self, prefix: &str) -> Result<(), StoreError> {
        runtime().block_on(async {
            match self.listing(prefix).next().await {
                Some(Err(e)) => Err(self.err(Op::List, prefix, e)),
                _ => Ok(()),
            }
        })
    }

    /// Streams the object `key` (of version `version`, when given) into `sink`, at most `max`
    /// bytes; its size, SHA-256 and version. `Ok(None)` when the object is gone or has another
    /// version now (a newer upload, found by the next listing). Over `max`, an error naming the
    /// limit.
    pub fn read(&self, key: &str, version: Option<&str>, max: u64, sink: &mut dyn Write) -> Result<Option<Read>> {
        let path = path(key);
        runtime().block_on(async {
            let got = match self.store.get_opts(&path, GetOptions::default()).await {
                Ok(g) => g,
                Err(e) => {
                    let e = self.err(Op::Get, key, e);
                    return if e.not_found() { Ok(None) } else { Err(e.into()) };
                }
            };
            let read_version = version_of(&got.meta);
            if version.is_some_and(|v| v != read_version) {
                return Ok(None);
            }
            let over = |size| OverLimit { url: self.url(key), size, max };
            if got.meta.size > max {
                return Err(over(got.meta.size).into());
            }
            let mut hash = Sha256::new();
            let mut size = 0u64;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.err(Op::Get, key, e))?;
                size += chunk.len() as u64;
                if size > max {
                    return Err(over(size).into());
                }
                hash.update(&chunk);
                sink.write_all(&chunk).context("cannot write the download")?;
            }
            Ok(Some(Read { size, sha256: crate::util::hex(&hash.finalize()), version: read_version }))
        })
    }

    /// The object's bytes and version, if it is there.
    pub fn get(&self, key: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>, StoreError> {
        let path = path(key);
        runtime().block_on(async {
            let got = match self.store.get(&path).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(self.err(Op::Get, key, e)),
            };
            let version = ObjectVersion { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
            let bytes = got.bytes().await.map_err(|e| self.err(Op::Get, key, e))?;
            Ok(Some((bytes.to_vec(), version)))
        })
    }

    /// Writes `bytes` under `key` only if no object is there (`If-None-Match: *`): `Ok(false)`
    /// when one is.
    pub fn create(&self, key: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        self.put(key, bytes, PutMode::Create)
    }

    /// Replaces the object `key` only if it is still the version that was read
    /// (`If-Match`): `Ok(false)` when it changed since.
    pub fn replace(&self, key: &str, bytes: Vec<u8>, read: &ObjectVersion) -> Result<bool, StoreError> {
        let v = UpdateVersion { e_tag: read.e_tag.clone(), version: read.version.clone() };
        self.put(key, bytes, PutMode::Update(v))
    }

    /// Writes `bytes` under `key`, whatever is there.
    pub fn overwrite(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.put(key, bytes, PutMode::Overwrite).map(drop)
    }

    fn put(&self, key: &str, bytes: Vec<u8>, mode: PutMode) -> Result<bool, StoreError> {
        let path = path(key);
        runtime().block_on(async {
            let opts = PutOptions { mode, ..Default::default() };
            match self.store.put_opts(&path, PutPayload::from(bytes), opts).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
                Err(e) => Err(self.err(Op::Put, key, e)),
            }
        })
    }

    /// Size and version of the object `key`, if it is there.
    pub fn head(&self, key: &str) -> Result<Option<(u64, String)>, StoreError> {
        let path = path(key);
        runtime().block_on(async {
            match self.store.head(&path).await {
                Ok(m) => Ok(Some((m.size, version_of(&m)))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(Op::Head, key, e)),
            }
        })
    }

    /// Deletes the object `key` (gone already is fine).
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = path(key);
        runtime().block_on(async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err(Op::Delete, key, e)),
            }
        })
    }
}

/// What [`Bucket::read`] read.
#[derive(Clone, Debug)]
pub struct Read {
    /// Bytes.
    pub size: u64,
    /// Their SHA-256 (hex).
    pub sha256: String,
    /// The version they are.
    pub version: String,
}

/// The version of an object that was read, for a conditional replace.
#[derive(Clone, Debug)]
pub struct ObjectVersion {
    e_tag: Option<String>,
    version: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::s3_server;
    use super::*;

    /// A throwaway server with bucket `name`, and deltadoc's client of it; `None` when SeaweedFS
    /// is missing and not required.
    pub(crate) fn server(name: &str) -> Option<(s3_server::S3Server, Bucket)> {
        let s3 = s3_server::S3Server::start()?;
        s3.bucket(name);
        let bucket = Bucket { store: s3.store(name), name: name.to_string() };
        Some((s3, bucket))
    }

    #[test]
    fn of_two_writers_creating_one_result_exactly_one_writes() {
        let Some((_s3, bucket)) = server("race") else { return };
        for n in 0..20 {
            let key = format!("results/doc-{n}.json");
            let start = std::sync::Barrier::new(2);
            let wrote: Vec<bool> = std::thread::scope(|s| {
                let writers: Vec<_> = (0..2u8)
                    .map(|w| {
                        let (bucket, key, start) = (&bucket, &key, &start);
                        s.spawn(move || {
                            start.wait();
                            bucket.create(key, vec![w; 1000]).unwrap()
                        })
                    })
                    .collect();
                writers.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(wrote.iter().filter(|w| **w).count(), 1, "{key}: {wrote:?}");
            let winner = wrote.iter().position(|w| *w).unwrap() as u8;
            assert_eq!(bucket.get(&key).unwrap().unwrap().0, vec![winner; 1000], "{key}: the winner's bytes stay");
        }
    }

    #[test]
    fn notifications_name_their_buckets_in_either_format() {
        let minio = br#"{"EventName":"s3:ObjectCreated:Put","Key":"inbox/a.pdf","Records":[{"eventName":"s3:ObjectCreated:Put",
            "s3":{"bucket":{"name":"inbox"},"object":{"key":"a.pdf","eTag":"x"}}}]}"#;
        assert_eq!(notified_buckets(minio), Some(vec!["inbox".to_string()]));
        let seaweed = br#"{"event_type":"create","key":"/buckets/docs/in/n.toml","message":{}}"#;
        assert_eq!(notified_buckets(seaweed), Some(vec!["docs".to_string()]));
        assert_eq!(notified_buckets(br#"{"event_type":"create","key":"/etc/x"}"#), None);
        assert_eq!(notified_buckets(b"not json"), None);
    }

    #[test]
    fn bucket_urls_parse_and_refuse_what_does_not_belong() {
        let u = BucketUrl::parse("s3://contracts-inbox/2026").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("contracts-inbox", "2026/"));
        assert_eq!(u.to_string(), "s3://contracts-inbox/2026/");
        assert_eq!(u.key(FsPath::new("a/b.pdf")), "2026/a/b.pdf");
        assert_eq!(BucketUrl::parse("s3://inbox").unwrap().prefix, "");
        assert!(u.overlaps(&BucketUrl::parse("s3://contracts-inbox/").unwrap()));
        assert!(!u.overlaps(&BucketUrl::parse("s3://contracts-inbox/2027/").unwrap()));
        for (bad, says) in [
            ("https://x/y", "only s3://"),
            ("s3://key:secret@bucket/p", "credentials"),
            ("s3://bucket:9000/p", "port"),
            ("s3://Bucket/p", "not a bucket name"),
            ("s3://bucket/a/../b", "'..'"),
        ] {
            let e = BucketUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains("secret"), "{bad}: {e}");
        }
    }
}
