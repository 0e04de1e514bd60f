//! TLS to the PostgreSQL ledger, set as for `psql` and every libpq client: `sslmode` and
//! `sslrootcert` in the URL (`postgres://…?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem`),
//! else `PGSSLMODE` and `PGSSLROOTCERT`; a client certificate from `sslcert` and `sslkey` (or
//! `PGSSLCERT`, `PGSSLKEY`). rust-postgres knows only `disable`, `prefer` (its default and
//! libpq's) and `require`, and none of the files: this module takes those out of the URL and
//! builds the rustls connector that does what libpq would. (libpq also looks for these files in
//! `~/.postgresql/`; deltadoc uses only the files it is told.)
//!
//! - With a root certificate (`sslrootcert`), the server's certificate must chain to it and name
//!   the host the URL names, whatever the mode (libpq checks the chain only under `verify-ca`; a
//!   certificate that does not name its host is refused here too).
//! - `verify-ca` and `verify-full` without one are refused: there is nothing to verify against.
//! - `prefer` and `require` without one encrypt without checking who answers, as libpq does:
//!   it protects against listening, not against a server impersonated on the network.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The files libpq's settings name: `sslrootcert`, `sslcert` and `sslkey`.
#[derive(Default)]
struct Files {
    root: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl Files {
    /// Those the URL left out, from `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY`.
    fn or_env(self, env: &impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| env(name).map(PathBuf::from);
        Self {
            root: self.root.or_else(|| var("PGSSLROOTCERT")),
            cert: self.cert.or_else(|| var("PGSSLCERT")),
            key: self.key.or_else(|| var("PGSSLKEY")),
        }
    }
}

/// The URL left for rust-postgres, and the connector for its `sslmode`.
pub(super) fn from_url(url: &str, env: impl Fn(&str) -> Option<String>) -> Result<(String, MakeRustlsConnect)> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        // A `key=value` string: rust-postgres reads its `sslmode`; the files only from the variables.
        return Ok((url.to_string(), connector(&Files::default().or_env(&env), false, "")?));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut mode, mut files) = (None, Files::default());
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || percent_encoding::percent_decode_str(value).decode_utf8_lossy().into_owned();
        match key {
            "sslrootcert" => files.root = Some(decoded().into()),
            "sslcert" => files.cert = Some(decoded().into()),
            "sslkey" => files.key = Some(decoded().into()),
            "sslmode" => mode = Some(decoded()),
            _ => kept.push(pair.to_string()),
        }
    }
    let mode = mode.or_else(|| env("PGSSLMODE")).unwrap_or_else(|| "prefer".into());
    let verify = match mode.as_str() {
        "disable" | "prefer" | "require" => false,
        "verify-ca" | "verify-full" => true,
        other => bail!("the ledger URL's sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"),
    };
    kept.push(format!("sslmode={}", if verify { "require" } else { mode.as_str() }));
    Ok((format!("{base}?{}", kept.join("&")), connector(&files.or_env(&env), verify, &mode)?))
}

/// Verifies against the certificates of `files.root`, or (unless `verify`, what `mode` asks) not
/// at all; shows the client certificate of `files.cert` and `files.key` when the server asks.
fn connector(files: &Files, verify: bool, mode: &str) -> Result<MakeRustlsConnect> {
    // rustls 0.23.48 deprecates ring's provider for its lack of post-quantum key exchange. The
    // provider that has it (aws-lc-rs) is a C build several times ring's on every CI run, for
    // traffic (job bookkeeping, on the operator's network) that does not call for it yet.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS: no protocol version the crypto provider supports")?;
    let server = match &files.root {
        Some(file) => builder.with_root_certificates(roots(file)?),
        None if verify => bail!(
            "the ledger URL's sslmode={mode} verifies the server's certificate: name the certificate authority that \
             signed it with sslrootcert=FILE in the URL (or PGSSLROOTCERT)"
        ),
        None => builder.dangerous().with_custom_certificate_verifier(Arc::new(Unverified(provider))),
    };
    let config = match (&files.cert, &files.key) {
        (None, None) => server.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: cannot read the ledger's client key: {e}", key.display());
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(&e))?;
            server
                .with_client_auth_cert(certificates(cert, "client certificate")?, key)
                .with_context(|| format!("{}: cannot use this client certificate with its key", cert.display()))?
        }
        _ => bail!("the ledger's client certificate needs both sslcert=FILE and sslkey=FILE (or PGSSLCERT and PGSSLKEY)"),
    };
    Ok(MakeRustlsConnect::new(config))
}

/// The certificates of a PEM file (`what` it is, for the message), at least one.
fn certificates(file: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{}: cannot read the ledger's {what}: {e}", file.display());
    let certs = CertificateDer::pem_file_iter(file).map_err(|e| bad(&e))?.collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The certificates of a PEM file, as the roots a server's certificate must chain to.
fn roots(file: &Path) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for cert in certificates(file, "root certificate")? {
        store.add(cert).with_context(|| format!("{}: cannot read the ledger's root certificate", file.display()))?;
    }
    Ok(store)
}

/// libpq's `prefer` and `require` without a root certificate: any certificate is taken, but the
/// handshake's signatures are still checked, so the session keys are the server's.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl Unverified {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.0.signature_verification_algorithms
    }
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url_for(url: &str, env: &[(&str, &str)]) -> Result<String> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_url(url, |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())).map(|(u, _)| u)
    }

    #[test]
    fn libpq_settings_leave_the_url_and_the_mode_reaches_rust_postgres() {
        assert_eq!(url_for("postgres://u@h/db", &[]).unwrap(), "postgres://u@h/db?sslmode=prefer");
        assert_eq!(
            url_for("postgres://u@h/db?application_name=x&sslmode=require", &[]).unwrap(),
            "postgres://u@h/db?application_name=x&sslmode=require"
        );
        assert_eq!(url_for("postgres://u@h/db", &[("PGSSLMODE", "disable")]).unwrap(), "postgres://u@h/db?sslmode=disable");
        assert_eq!(
            url_for("postgres://u@h/db?sslmode=disable", &[("PGSSLMODE", "require")]).unwrap(),
            "postgres://u@h/db?sslmode=disable",
            "the URL wins"
        );
        let e = url_for("postgres://u@h/db?sslmode=verify-full", &[]).unwrap_err().to_string();
        assert!(e.contains("sslrootcert=FILE"), "{e}");
        let e = url_for("postgres://u@h/db?sslmode=allow", &[]).unwrap_err().to_string();
        assert!(e.contains("\"allow\""), "{e}");
        let e = url_for("postgres://u@h/db?sslcert=/c.pem", &[]).unwrap_err().to_string();
        assert!(e.contains("both sslcert=FILE and sslkey=FILE"), "{e}");
        let e = url_for("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/no%20such.pem", &[]).unwrap_err().to_string();
        assert!(e.contains("/no such.pem: cannot read the ledger's root certificate"), "{e}");
    }
}
