//! TLS to Postgres: a tokio-postgres connector over tokio-rustls (ring), and
//! the `sslmode` the companion reads from the connection string.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and leaves the
//! certificate check to the connector. [`SslMode::split`] therefore takes the
//! mode out of the string (libpq's five values), hands tokio-postgres the
//! negotiation it understands, and [`PgTls`] checks the certificate:
//!
//! - no `sslmode`, or `disable`: plaintext, exactly as before TLS support (the
//!   `NoTls` connector; unlike libpq, whose default is `prefer`).
//! - `prefer`: TLS when the server offers it, plaintext when it does not; a
//!   certificate, once offered, is checked as for `verify-ca`.
//! - `require`, `verify-ca`: TLS or no connection; the chain must lead to a
//!   trusted root, the host name is not checked. libpq's `require` checks
//!   nothing unless a root CA file exists: the companion always has roots (the
//!   `--pg-ca-file` PEM or the webpki roots), so it never accepts a certificate
//!   nobody signed.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host of
//!   the URL (DNS name or IP address).
//!
//! Trusted roots: the `--pg-ca-file` PEM only (a private CA such as the RDS
//! bundle), else the webpki (Mozilla) roots. There is no mode that encrypts
//! without checking the certificate. The session offers no channel binding
//! (SCRAM without `-PLUS`); a URL with `channel_binding=require` fails.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::{Error, Result};

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext (also what no `sslmode` means to the companion).
    Disable,
    /// TLS if the server offers it.
    Prefer,
    /// TLS, chain checked.
    Require,
    /// TLS, chain checked.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

impl SslMode {
    fn from_value(v: &str) -> Option<Self> {
        Some(match v {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// True when the mode may use TLS.
    pub fn uses_tls(self) -> bool {
        self != Self::Disable
    }

    /// The negotiation tokio-postgres is told about.
    fn tokio_value(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require | Self::VerifyCa | Self::VerifyFull => "require",
        }
    }

    /// Finds `sslmode` in a URL (`postgres://…?sslmode=…`) or key/value
    /// (`host=… sslmode=…`) connection string: returns the string with every
    /// `sslmode` value replaced by one tokio-postgres parses, and the mode
    /// (the last one, as libpq; `None` when absent). Errors never quote the
    /// string.
    pub fn split(conn: &str) -> Result<(String, Option<SslMode>)> {
        let spans = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
            url_spans(conn)
        } else {
            key_value_spans(conn)
        };
        let mut out = String::with_capacity(conn.len());
        let mut mode = None;
        let mut last = 0;
        for (start, end, value) in spans {
            let m = SslMode::from_value(&value).ok_or_else(|| {
                Error::Config(
                    "sslmode must be disable, prefer, require, verify-ca or verify-full".into(),
                )
            })?;
            out.push_str(&conn[last..start]);
            out.push_str(m.tokio_value());
            last = end;
            mode = Some(m);
        }
        out.push_str(&conn[last..]);
        Ok((out, mode))
    }
}

/// Byte span and decoded value of every `sslmode` in a URL's query.
fn url_spans(conn: &str) -> Vec<(usize, usize, String)> {
    let Some(q) = conn.find('?') else {
        return Vec::new();
    };
    let mut spans = Vec::new();
    let mut pos = q + 1;
    for param in conn[q + 1..].split('&') {
        if let Some((k, v)) = param.split_once('=') {
            if percent_decode(k) == "sslmode" {
                let start = pos + k.len() + 1;
                spans.push((start, start + v.len(), percent_decode(v)));
            }
        }
        pos += param.len() + 1;
    }
    spans
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Byte span (of the value as written, quotes included) and unescaped value
/// of every `sslmode` in a libpq key/value string.
fn key_value_spans(conn: &str) -> Vec<(usize, usize, String)> {
    let b = conn.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            break;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &conn[key_start..i];
        i = skip_ws(i);
        if i >= b.len() || b[i] != b'=' {
            // Malformed: tokio-postgres refuses it later.
            break;
        }
        i = skip_ws(i + 1);
        let value_start = i;
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        if key == "sslmode" {
            spans.push((value_start, i, String::from_utf8_lossy(&value).into_owned()));
        }
    }
    spans
}

/// Reads the PEM certificates of a CA file; refuses a file with none (which
/// would trust nothing and fail every connection, far from the cause).
pub fn parse_ca_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        certs.push(cert.map_err(|_| {
            Error::Config("the Postgres CA file holds a malformed PEM certificate".into())
        })?);
    }
    if certs.is_empty() {
        return Err(Error::Config(
            "the Postgres CA file holds no PEM certificate".into(),
        ));
    }
    Ok(certs)
}

/// Accepts a certificate whose chain checks out, whatever host it names
/// (`verify-ca`): rustls checks the chain before the name, so only a name
/// mismatch is forgiven.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The tokio-postgres TLS connector: one rustls configuration shared by every
/// connection of a pool.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgTls")
    }
}

impl PgTls {
    /// A connector for `mode` (one that uses TLS) trusting `ca` only, or the
    /// webpki roots when `ca` is `None`.
    pub fn new(mode: SslMode, ca: Option<&[u8]>) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        match ca {
            Some(pem) => {
                for cert in parse_ca_pem(pem)? {
                    roots.add(cert).map_err(|_| {
                        Error::Config("the Postgres CA file holds an unusable certificate".into())
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_error =
            |e: rustls::Error| Error::Config(format!("cannot set up Postgres TLS: {e}"));
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?;
        let mut config = if mode == SslMode::VerifyFull {
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Config(format!("cannot set up Postgres TLS: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
                .with_no_client_auth()
        };
        // What PostgreSQL 17+ expects of a TLS client; older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> std::result::Result<PgTlsConnect, Self::Error> {
        Ok(PgTlsConnect {
            config: self.config.clone(),
            name: ServerName::try_from(domain.to_owned())?,
        })
    }
}

/// One connection's handshake.
pub struct PgTlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Handshake<S>;

    fn connect(self, stream: S) -> Handshake<S> {
        Box::pin(async move {
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(PgTlsStream)
        })
    }
}

/// A TLS session to Postgres.
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_sslmode_is_taken_out() {
        let (s, m) = SslMode::split(
            "postgres://u:p@db.example:5432/x?application_name=a&sslmode=verify-full",
        )
        .unwrap();
        assert_eq!(m, Some(SslMode::VerifyFull));
        assert_eq!(
            s,
            "postgres://u:p@db.example:5432/x?application_name=a&sslmode=require"
        );
        let (s, m) = SslMode::split("postgresql://h/x?sslmode=verify%2Dca").unwrap();
        assert_eq!(m, Some(SslMode::VerifyCa));
        assert_eq!(s, "postgresql://h/x?sslmode=require");
        let (s, m) = SslMode::split("postgres://h/x").unwrap();
        assert_eq!((s.as_str(), m), ("postgres://h/x", None));
    }

    #[test]
    fn key_value_sslmode_is_taken_out() {
        let (s, m) =
            SslMode::split("host=h password='a b' sslmode = 'verify-full' user=u").unwrap();
        assert_eq!(m, Some(SslMode::VerifyFull));
        assert_eq!(s, "host=h password='a b' sslmode = require user=u");
        let (_, m) = SslMode::split("host=h sslmode=disable").unwrap();
        assert_eq!(m, Some(SslMode::Disable));
        let (_, m) = SslMode::split("host=h sslmode=require sslmode=prefer").unwrap();
        assert_eq!(m, Some(SslMode::Prefer));
    }

    #[test]
    fn unknown_sslmode_is_refused_without_echo() {
        let err = SslMode::split("postgres://u:hunter2@h/x?sslmode=allow").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
        assert!(err.to_string().contains("sslmode"));
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        assert!(parse_ca_pem(b"not a pem").is_err());
        assert!(PgTls::new(SslMode::VerifyFull, None).is_ok());
    }
}
