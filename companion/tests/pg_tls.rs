//! TLS to Postgres (what RDS with `rds.force_ssl` or Supabase require) end to
//! end: a PostgreSQL 15 with `ssl=on`, a certificate for `localhost` from a
//! test CA made by the `openssl` CLI, and `hostssl` only in pg_hba.conf (a
//! plaintext session is refused). `migrate` (the binary), the admin
//! connection and the store's pool work over `sslmode=verify-full` with the CA
//! file; without that CA, with another CA, under a name the certificate does
//! not carry, or in plaintext, nothing connects.

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use ibex_companion::db::{self, PgEndpoint, PoolSettings};
use ibex_companion::store::{self, StoreOptions, StoreState};
use ibex_companion::{admin, DbFailure, DirectiveText, Error};
use tempfile::TempDir;
use uuid::Uuid;

/// A Postgres that speaks TLS only, its certificate for the DNS name
/// `localhost` (not the IP address 127.0.0.1) signed by `ca.crt` in `certs`.
struct TlsPg {
    pg: Pg,
    certs: TempDir,
}

impl TlsPg {
    fn start() -> TlsPg {
        let pg = Pg::start();
        pg.stop();
        let certs = tempfile::Builder::new()
            .prefix("ibex-pg-tls-")
            .tempdir()
            .unwrap();
        let d = certs.path();
        make_ca(d, "ca");
        make_ca(d, "other");
        server_cert(d, "localhost", "DNS:localhost");
        // Into the data dir, owned by the server's user, the key 0600 (the
        // server refuses a key others can read).
        let data = pg.data();
        for f in ["server.crt", "server.key"] {
            std::fs::copy(d.join(f), data.join(f)).unwrap();
        }
        let mut chmod = Command::new("chmod");
        chmod.arg("600").arg(data.join("server.key"));
        assert!(chmod.status().unwrap().success());
        if is_root() {
            let mut chown = Command::new("chown");
            chown
                .arg("postgres:postgres")
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"));
            assert!(chown.status().unwrap().success());
        }
        // TCP only with TLS; the Unix socket (pg_ctl's readiness check) stays.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        pg.resume();
        TlsPg { pg, certs }
    }

    fn ca(&self) -> PathBuf {
        self.certs.path().join("ca.crt")
    }

    fn other_ca(&self) -> PathBuf {
        self.certs.path().join("other.crt")
    }

    /// URL to `host` with `sslmode` (none when empty).
    fn url(&self, host: &str, sslmode: &str) -> String {
        let mut u = format!("postgres://postgres@{host}:{}/postgres", self.pg.port);
        if !sslmode.is_empty() {
            u.push_str("?sslmode=");
            u.push_str(sslmode);
        }
        u
    }

    /// The endpoint that works: verify-full to `localhost` with the test CA.
    fn good(&self) -> PgEndpoint {
        PgEndpoint::new(self.url("localhost", "verify-full"))
            .with_ca_file(&self.ca())
            .unwrap()
    }
}

async fn connect_err(e: PgEndpoint) -> String {
    match db::connect(e, Duration::from_secs(5)).await {
        Ok(_) => panic!("connected"),
        Err(Error::Db(DbFailure::Connection(text))) => text,
        Err(other) => panic!("not a connection failure: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_admin_and_store_over_verify_full_with_the_ca_file() {
    let pg = TlsPg::start();
    let url = pg.url("localhost", "verify-full");
    let ca = pg.ca();
    let out = companion(&[
        "migrate",
        "--database-url",
        &url,
        "--pg-ca-file",
        ca.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "migrate over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The admin connection really is TLS.
    let client = db::connect(pg.good(), Duration::from_secs(5))
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));

    let agent = Uuid::new_v4();
    let text = "Answer over TLS only.";
    let version = admin::write_directive(
        &pg.good(),
        agent,
        admin::DEMO_ORG_ID,
        &DirectiveText::new(text),
    )
    .await
    .unwrap()
    .version_id;

    let pool = db::read_only_pool(pg.good(), &PoolSettings::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(store::run(
        listener,
        StoreState::new(pool, StoreOptions::default()),
        async move {
            let _ = stopped.await;
        },
    ));
    let (status, body) = http_json(&format!("{base}/v1/agents/{agent}/directive")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], text);
    assert_eq!(body["version_id"], version.to_string());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_right_ca_name_or_tls_nothing_connects() {
    let pg = TlsPg::start();

    // No CA file: the webpki roots do not know the test CA.
    let text = connect_err(PgEndpoint::new(pg.url("localhost", "verify-full"))).await;
    assert!(text.contains("UnknownIssuer"), "{text}");
    // require also checks the chain (there is no unchecked TLS).
    let text = connect_err(PgEndpoint::new(pg.url("localhost", "require"))).await;
    assert!(text.contains("UnknownIssuer"), "{text}");

    // Another CA.
    let other = PgEndpoint::new(pg.url("localhost", "verify-full"))
        .with_ca_file(&pg.other_ca())
        .unwrap();
    let text = connect_err(other).await;
    assert!(
        text.contains("UnknownIssuer") || text.contains("BadSignature"),
        "{text}"
    );

    // The right CA, but 127.0.0.1 is not a name the certificate carries.
    let by_ip = |mode: &str| {
        PgEndpoint::new(pg.url("127.0.0.1", mode))
            .with_ca_file(&pg.ca())
            .unwrap()
    };
    let text = connect_err(by_ip("verify-full")).await;
    assert!(text.contains("certificate not valid for name"), "{text}");
    // verify-ca and require check the chain only, so they connect.
    for mode in ["verify-ca", "require", "prefer"] {
        db::connect(by_ip(mode), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
    }

    // Plaintext (sslmode=disable, or none: the behaviour before TLS support)
    // is refused by the server: no pg_hba.conf entry (28000).
    for mode in ["disable", ""] {
        let err = db::connect(pg.url("localhost", mode).as_str(), Duration::from_secs(5))
            .await
            .map(|_| ())
            .unwrap_err();
        match err {
            Error::Db(f) => assert_eq!(f.sqlstate(), Some("28000"), "{mode:?}: {f}"),
            other => panic!("{mode:?}: {other}"),
        }
    }

    // A CA file beside a URL that does not ask for TLS is a configuration
    // error, found before connecting; the message does not quote the URL.
    let err = PgEndpoint::new("postgres://postgres:hunter2@localhost/postgres")
        .with_ca_file(&pg.ca())
        .unwrap()
        .config()
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(!err.to_string().contains("hunter2"));

    // The binary says so too, and fails without the CA.
    let out = companion(&[
        "migrate",
        "--database-url",
        &pg.url("localhost", "verify-full"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
}
