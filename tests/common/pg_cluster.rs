//! A throwaway PostgreSQL cluster for the fleet tests: `initdb` into a temporary folder, the
//! server on a free port of 127.0.0.1 (`ports.rs`) with password authentication, stopped and
//! removed on drop.
//! The binaries come from `PATH` or Debian's `/usr/lib/postgresql/<version>/bin` (the
//! `postgresql` package; `.ci/run` installs it). `initdb` refuses to run as root, so as root the
//! cluster runs as the `postgres` user. Without PostgreSQL the tests that need it are skipped with
//! a note, unless `DELTADOC_POSTGRES=required` (CI) makes that a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The superuser of the test clusters and its password.
pub const USER: &str = "deltadoc";
pub const PASSWORD: &str = "fleet-test-password";

/// A running throwaway cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
    /// Server settings (`name=value`) beyond the port and socket.
    settings: Vec<String>,
}

/// The folder holding `initdb` and `pg_ctl`.
fn binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file());
    on_path.or_else(|| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten().map(|e| e.path()).collect();
        versions.sort_by_key(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok()));
        versions.into_iter().rev().map(|v| v.join("bin")).find(|b| b.join("initdb").is_file())
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Cluster {
    /// Starts a cluster for tests (no fsync: what a test writes need not survive a power cut),
    /// or `None` (said on stderr) when PostgreSQL is not installed and not required.
    pub fn start() -> Option<Cluster> {
        Self::start_with(&["fsync=off"])
    }

    /// [`Cluster::start`] with these server settings (`name=value`); none: as installed, durable.
    pub fn start_with(settings: &[&str]) -> Option<Cluster> {
        let Some(bin) = binaries() else {
            if std::env::var("DELTADOC_POSTGRES").as_deref() == Ok("required") {
                panic!("DELTADOC_POSTGRES=required but no initdb on PATH or in /usr/lib/postgresql/*/bin");
            }
            eprintln!("skipped: PostgreSQL is not installed (Debian: apt-get install postgresql)");
            return None;
        };
        let dir = tempfile::Builder::new().prefix("deltadoc-pg").tempdir().unwrap();
        let as_postgres = is_root();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, PASSWORD).unwrap();
        if as_postgres {
            let chown = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(chown.success(), "chown of the cluster folder to postgres failed");
        }
        let settings = settings.iter().map(|s| s.to_string()).collect();
        let c = Cluster { dir, bin, port: super::ports::restartable(1), as_postgres, settings };
        let data = c.data();
        c.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                USER,
                "--pwfile",
                pw.to_str().unwrap(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        c.pg_ctl("start");
        Some(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs a PostgreSQL binary (as `postgres` when this process is root); panics with its output
    /// when it fails.
    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&exe).args(args).output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:\n{}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// `pg_ctl start`, `stop` (immediate: as a crash would) or `restart`, waiting for it.
    pub fn pg_ctl(&self, action: &str) {
        let (data, log) = (self.data(), self.log());
        let mut opts =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200", self.port, self.data().display());
        for s in &self.settings {
            opts.push_str(&format!(" -c {s}"));
        }
        let mut args = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "-t", "60"];
        if action != "stop" {
            args.extend(["-o", &opts]);
        }
        if action != "start" {
            args.extend(["-m", "immediate"]);
        }
        args.push(action);
        self.run("pg_ctl", &args);
    }

    /// A URL of database `db` without the password (the tests pass it like an operator would).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` and returns its URL.
    pub fn database(&self, db: &str) -> String {
        let mut c = self.client("postgres");
        c.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
        self.url(db)
    }

    /// A client of database `db`, for checks behind the ledger's back.
    pub fn client(&self, db: &str) -> postgres::Client {
        let url = format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port);
        postgres::Client::connect(&url, postgres::NoTls).unwrap()
    }

    /// A file holding the password, as `ledger_password_file` names it.
    pub fn password_file(&self) -> PathBuf {
        let f = self.dir.path().join("ledger-password");
        if !f.exists() {
            std::fs::write(&f, format!("{PASSWORD}\n")).unwrap();
        }
        f
    }

    /// The cluster's folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Hands a file the test wrote to the server's user, readable by it alone (as PostgreSQL
    /// requires of a TLS key).
    pub fn hand_over(&self, file: &Path) {
        if self.as_postgres {
            let chown = Command::new("chown").arg("postgres:postgres").arg(file).status().unwrap();
            assert!(chown.success(), "chown of {} to postgres failed", file.display());
        }
        std::fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }

    /// Replaces `pg_hba.conf` and reloads the configuration.
    pub fn reload_with_hba(&self, hba: &str) {
        let file = self.data().join("pg_hba.conf");
        std::fs::write(&file, hba).unwrap();
        self.hand_over(&file);
        self.reload();
    }

    fn reload(&self) {
        let data = self.data();
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "reload"]);
    }

    /// Turns TLS on with a certificate for 127.0.0.1 signed by a throwaway authority, whose
    /// certificate it returns (what `sslrootcert` names). Plain connections are still taken.
    /// `None` (said on stderr) without `openssl`, unless `DELTADOC_POSTGRES=required`.
    pub fn enable_tls(&self) -> Option<PathBuf> {
        if !super::certs::available() {
            assert!(std::env::var("DELTADOC_POSTGRES").as_deref() != Ok("required"), "openssl is required for certificates");
            eprintln!("skipped: no openssl to make the TLS certificates");
            return None;
        }
        let root = self.authority("ca");
        let (pem, key) = super::certs::localhost(self.path(), "server");
        let mut sql = self.client("postgres");
        for (setting, file) in [("ssl_cert_file", &pem), ("ssl_key_file", &key)] {
            self.hand_over(file);
            sql.batch_execute(&format!("ALTER SYSTEM SET {setting} = '{}'", file.display())).unwrap();
        }
        sql.batch_execute("ALTER SYSTEM SET ssl = on").unwrap();
        self.reload();
        Some(root)
    }

    /// A client certificate for `user` (its common name) signed by [`Cluster::enable_tls`]'s
    /// authority, which the server is told to trust for clients: the certificate and key files.
    pub fn client_certificate(&self, user: &str) -> (PathBuf, PathBuf) {
        let signed = self.signed(user, &format!("/CN={user}"), "extendedKeyUsage=clientAuth");
        let mut sql = self.client("postgres");
        sql.batch_execute(&format!("ALTER SYSTEM SET ssl_ca_file = '{}'", self.path().join("ca.pem").display())).unwrap();
        self.reload();
        signed
    }

    /// A certificate `<name>.pem` for `subject`, signed by the authority `ca`
    /// ([`Cluster::authority`]), and its key `<name>.key`, in the cluster's folder.
    fn signed(&self, name: &str, subject: &str, extensions: &str) -> (PathBuf, PathBuf) {
        super::certs::signed(self.path(), name, subject, extensions)
    }

    /// A throwaway certificate authority `name`: its certificate (`<name>.pem` in the cluster's
    /// folder).
    pub fn authority(&self, name: &str) -> PathBuf {
        super::certs::authority(self.path(), name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let args = ["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"];
        let exe = self.bin.join("pg_ctl");
        let _ = if self.as_postgres {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&exe).args(args).output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}
