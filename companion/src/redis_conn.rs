//! Where every Redis client of the companion comes from (subscribe, the admin
//! publishes, the REST front): a [`RedisEndpoint`], the URL plus, optionally, a
//! private CA to trust.
//!
//! `redis://` is plain TCP. `rediss://` is TLS through rustls (ring), checking
//! the server's certificate and name against the webpki (Mozilla) roots — what a
//! managed Redis such as Upstash presents — or, with `--redis-ca-file`, against
//! that PEM's certificates only (a private CA; the public roots are then not
//! trusted). There is no "insecure" mode: a certificate that does not check out
//! means no connection.
//!
//! A Redis Cluster (self-managed, ElastiCache cluster mode) is named by
//! [`RedisEndpoint::with_cluster`] (`--redis-cluster`): the URL is then a
//! comma-separated list of seed nodes (one is enough; the client learns the
//! others from the cluster), and [`RedisEndpoint::cluster_client`] gives the
//! client that routes each command to the master of its key's slot. Pub/sub and
//! `PUBLISH` need no routing (a cluster broadcasts them to every node), so they
//! use a plain client to one seed ([`RedisEndpoint::seed_clients`]).
//!
//! What it must never do: put the URL into an error or a `Debug` (it may carry
//! a password), or accept a CA file with no certificate in it (which would
//! silently trust nothing and fail every connection later, far from the cause).

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Once};

use ibex_wire::Redacted;
use redis::IntoConnectionInfo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::{Error, Result};

/// A Redis server to connect to: URL and optional private CA. Its `Debug`
/// shows neither the URL nor the certificates.
#[derive(Clone)]
pub struct RedisEndpoint {
    url: Redacted<String>,
    ca_pem: Option<Arc<[u8]>>,
    cluster: bool,
}

impl fmt::Debug for RedisEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEndpoint")
            .field("url", &self.url)
            .field("tls", &self.is_tls())
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(|p| p.len()))
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// rustls needs one process-wide crypto provider; the redis crate enables
/// none, so the companion installs ring's before any TLS client is built.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means another provider is already installed: keep that one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl RedisEndpoint {
    /// An endpoint trusting the webpki roots (for `rediss://`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: Redacted::new(url.into()),
            ca_pem: None,
            cluster: false,
        }
    }

    /// Names a Redis Cluster (`true`): the URL is then a comma-separated list of
    /// seed nodes, all `redis://` or all `rediss://`.
    pub fn with_cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// True for a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The URLs: the one URL, or a cluster's seeds (never empty ones).
    fn urls(&self) -> Vec<&str> {
        let url = self.url.expose().as_str();
        if !self.cluster {
            return vec![url];
        }
        url.split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// Trusts the certificates of `pem` (and only those) for `rediss://`.
    /// Refused when it holds no PEM certificate.
    pub fn with_ca_pem(mut self, pem: Vec<u8>) -> Result<Self> {
        let mut count = 0usize;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            cert.map_err(|_| {
                Error::Config("the Redis CA file holds a malformed PEM certificate".into())
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(Error::Config(
                "the Redis CA file holds no PEM certificate".into(),
            ));
        }
        self.ca_pem = Some(pem.into());
        Ok(self)
    }

    /// [`RedisEndpoint::with_ca_pem`] with the contents of `path`.
    pub fn with_ca_file(self, path: &Path) -> Result<Self> {
        let pem = std::fs::read(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the Redis CA file {}: {e}",
                path.display()
            ))
        })?;
        self.with_ca_pem(pem)
    }

    /// The URL (it may carry a password: never log it).
    pub fn url(&self) -> &Redacted<String> {
        &self.url
    }

    /// True for a `rediss://` URL.
    pub fn is_tls(&self) -> bool {
        self.url.expose().starts_with("rediss://")
    }

    /// A client for this endpoint (it does not connect yet): for a cluster, to
    /// its first seed (enough for `PUBLISH`, which a cluster broadcasts). Errors
    /// name what is wrong, never the URL.
    pub fn client(&self) -> Result<redis::Client> {
        let seeds = self.seed_clients()?;
        seeds
            .into_iter()
            .next()
            .ok_or_else(|| Error::Config("REDIS_URL names no Redis node".into()))
    }

    /// One client per URL (a cluster's seeds, in order; else the one URL).
    pub fn seed_clients(&self) -> Result<Vec<redis::Client>> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err(Error::Config("REDIS_URL names no Redis node".into()));
        }
        urls.into_iter().map(|u| self.client_for(u)).collect()
    }

    /// The cluster client over the seeds, every command and connection bounded
    /// by `timeout`; refused for an endpoint that is not a cluster.
    pub fn cluster_client(
        &self,
        timeout: std::time::Duration,
    ) -> Result<redis::cluster::ClusterClient> {
        if !self.cluster {
            return Err(Error::Config("not a Redis Cluster endpoint".into()));
        }
        let invalid = || Error::Config("REDIS_URL is not a list of valid Redis URLs".into());
        let mut infos = Vec::new();
        for url in self.urls() {
            infos.push(url.into_connection_info().map_err(|_| invalid())?);
        }
        let tls = infos
            .iter()
            .filter(|i| matches!(i.addr, redis::ConnectionAddr::TcpTls { .. }))
            .count();
        if tls != 0 && tls != infos.len() {
            return Err(Error::Config(
                "the Redis Cluster seeds mix redis:// and rediss://".into(),
            ));
        }
        if tls != 0 {
            install_crypto_provider();
        } else if self.ca_pem.is_some() {
            return Err(Error::Config(
                "--redis-ca-file needs a rediss:// REDIS_URL".into(),
            ));
        }
        let mut builder = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(timeout)
            .response_timeout(timeout);
        if let Some(pem) = &self.ca_pem {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            });
        }
        builder.build().map_err(|_| invalid())
    }

    fn client_for(&self, url: &str) -> Result<redis::Client> {
        let invalid = || Error::Config("REDIS_URL is not a valid Redis URL".into());
        let info = url.into_connection_info().map_err(|_| invalid())?;
        let tls = matches!(info.addr, redis::ConnectionAddr::TcpTls { .. });
        if tls {
            install_crypto_provider();
        }
        match &self.ca_pem {
            None => redis::Client::open(info).map_err(|_| invalid()),
            Some(_) if !tls => Err(Error::Config(
                "--redis-ca-file needs a rediss:// REDIS_URL".into(),
            )),
            Some(pem) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            )
            .map_err(|_| Error::Config("the Redis CA file cannot be used".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_A_CERT: &[u8] =
        b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";

    #[test]
    fn plain_and_tls_urls_make_clients() {
        assert!(RedisEndpoint::new("redis://127.0.0.1:6379")
            .client()
            .is_ok());
        let e = RedisEndpoint::new("rediss://:pw@example.upstash.io:6379");
        assert!(e.is_tls());
        assert!(e.client().is_ok());
        let err = RedisEndpoint::new("http://:hunter2@x")
            .client()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn ca_files_must_hold_a_certificate_and_need_tls() {
        let e = RedisEndpoint::new("rediss://127.0.0.1:1");
        assert!(e.clone().with_ca_pem(Vec::new()).is_err());
        assert!(e.clone().with_ca_pem(b"hello".to_vec()).is_err());
        assert!(e.clone().with_ca_pem(NOT_A_CERT.to_vec()).is_err());
        let err = e
            .with_ca_file(Path::new("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn cluster_endpoints_take_seed_lists() {
        let e = RedisEndpoint::new("redis://127.0.0.1:7000, redis://127.0.0.1:7001,")
            .with_cluster(true);
        assert_eq!(e.seed_clients().unwrap().len(), 2);
        assert!(e.client().is_ok());
        assert!(e.cluster_client(std::time::Duration::from_secs(1)).is_ok());
        // Not a cluster: one URL, and no cluster client.
        let single = RedisEndpoint::new("redis://127.0.0.1:7000");
        assert!(single
            .cluster_client(std::time::Duration::from_secs(1))
            .is_err());
        let mixed =
            RedisEndpoint::new("redis://127.0.0.1:7000,rediss://:pw@h:7001").with_cluster(true);
        let Err(err) = mixed.cluster_client(std::time::Duration::from_secs(1)) else {
            panic!("mixed seeds accepted");
        };
        let err = err.to_string();
        assert!(!err.contains("pw@"), "{err}");
        assert!(RedisEndpoint::new(" , ")
            .with_cluster(true)
            .client()
            .is_err());
    }

    #[test]
    fn debug_hides_the_url() {
        let e = RedisEndpoint::new("rediss://:hunter2@example:6379");
        let d = format!("{e:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("tls: true"), "{d}");
    }
}
