//! TLS of the control plane (`--tls-cert`, `--tls-key`, `--client-ca`):
//! rustls with the ring provider, on the TCP connections of both the gRPC
//! control API (ALPN `h2`) and the HTTP API (ALPN `http/1.1`).
//!
//! Both servers accept with the control API's accept stream
//! ([`crate::grpc::Incoming`]); [`TlsIncoming`] sits on top of it, the one
//! code path of both. The handshake of each accepted connection runs in a
//! task of its own, bounded by [`HANDSHAKE_TIMEOUT`], and the finished
//! connections reach the server through a channel: a client that connects
//! and says nothing holds up no one.
//!
//! With `--client-ca`, the server asks for a client certificate and
//! verifies it against that CA. Without a token file the certificate is
//! required (a client without one fails the handshake); with a token file
//! it is optional, and a client without one is checked by its token as on
//! plain TCP. A verified client certificate is admin: the audit log names
//! it `cert:CN` (its subject's common name), or `cert:sha256:HEX` (the
//! first 16 hex digits of its SHA-256 fingerprint) when it has no CN.
//!
//! A config reload (SIGHUP, `ReloadConfig`) reads the three files again,
//! so a certificate is renewed, or a CA rotated, without a restart: new
//! handshakes use the new files, connections already open keep theirs. A
//! file that no longer loads fails the reload, and the old ones stay.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::server::Connected;

use crate::grpc::ControlStream;

/// How long a client has to finish its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes finished and not yet taken by the server.
const READY_QUEUE: usize = 64;

/// The files of the TLS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) client_ca: Option<PathBuf>,
}

/// The server configurations, loaded and checked at start, and replaced by
/// a config reload (every clone sees the replacement).
#[derive(Debug, Clone)]
pub(crate) struct Tls {
    files: TlsFiles,
    client_cert_optional: bool,
    /// The lock is held only to clone an `Arc` (a reload swaps it).
    configs: Arc<RwLock<Arc<ServerConfigs>>>,
}

/// The server configuration of each protocol, built from the files and not
/// yet in force until [`Tls::replace`].
#[derive(Debug)]
pub(crate) struct ServerConfigs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

/// Which server a connection is for: its ALPN protocol.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Protocol {
    /// gRPC: `h2`.
    Grpc,
    /// The HTTP API: `http/1.1`.
    Http,
}

impl Tls {
    /// Reads the certificate chain, its key and the client CA.
    /// `client_cert_optional` (a token file is configured) lets a client
    /// without a certificate through the handshake.
    ///
    /// # Errors
    ///
    /// One line naming the file and the problem: unreadable, no PEM
    /// certificate or key in it, a key that does not match the
    /// certificate, a CA rustls refuses.
    pub(crate) fn load(files: &TlsFiles, client_cert_optional: bool) -> anyhow::Result<Tls> {
        let configs = ServerConfigs::build(files, client_cert_optional)?;
        Ok(Tls { files: files.clone(), client_cert_optional, configs: Arc::new(RwLock::new(Arc::new(configs))) })
    }

    /// Reads the files again, for [`replace`](Tls::replace) once the rest of
    /// a reload succeeded.
    ///
    /// # Errors
    ///
    /// As [`load`](Tls::load)'s.
    pub(crate) fn reread(&self) -> anyhow::Result<ServerConfigs> {
        ServerConfigs::build(&self.files, self.client_cert_optional)
    }

    /// Puts `configs` in force for the handshakes from now on. Returns the
    /// certificate file.
    pub(crate) fn replace(&self, configs: ServerConfigs) -> &Path {
        *self.configs.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(configs);
        &self.files.cert
    }

    /// The acceptor of `protocol`'s connections, with the files in force.
    fn acceptor(&self, protocol: Protocol) -> TlsAcceptor {
        let configs = self.configs.read().unwrap_or_else(PoisonError::into_inner).clone();
        TlsAcceptor::from(match protocol {
            Protocol::Grpc => configs.grpc.clone(),
            Protocol::Http => configs.http.clone(),
        })
    }
}

impl ServerConfigs {
    fn build(files: &TlsFiles, client_cert_optional: bool) -> anyhow::Result<ServerConfigs> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs("TLS certificate", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| anyhow::anyhow!("TLS key {}: {}", files.key.display(), pem_error(&e, "private key")))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("rustls refuses its default protocol versions")?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs("client CA", path)? {
                    roots.add(cert).map_err(|e| anyhow::anyhow!("client CA {}: {e}", path.display()))?;
                }
                let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                if client_cert_optional {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier.build().map_err(|e| anyhow::anyhow!("client CA {}: {e}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs, key).map_err(|e| {
            anyhow::anyhow!("TLS certificate {} with key {}: {e}", files.cert.display(), files.key.display())
        })?;
        let with_alpn = |protocol: &[u8]| {
            let mut config = config.clone();
            config.alpn_protocols = vec![protocol.to_vec()];
            Arc::new(config)
        };
        Ok(ServerConfigs { grpc: with_alpn(b"h2"), http: with_alpn(b"http/1.1") })
    }
}

/// Every certificate of a PEM file; at least one.
fn read_certs(what: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow::anyhow!("{what} {}: {}", path.display(), pem_error(&e, "certificate")))?
        .collect();
    let certs = certs.map_err(|e| anyhow::anyhow!("{what} {}: {}", path.display(), pem_error(&e, "certificate")))?;
    if certs.is_empty() {
        anyhow::bail!("{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it", path.display());
    }
    Ok(certs)
}

/// A PEM error in words.
fn pem_error(error: &rustls_pki_types::pem::Error, item: &str) -> String {
    use rustls_pki_types::pem::Error;
    match error {
        Error::Io(e) => format!("cannot read it: {e}"),
        Error::NoItemsFound => format!("no PEM {item} in it"),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// What a TLS connection tells about its client: its address and, when it
/// presented a verified certificate, its name (`CN`, or `sha256:HEX`).
#[derive(Debug, Clone)]
pub(crate) struct TlsConnectInfo {
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) client_cert: Option<String>,
}

/// An accepted TLS connection of the control plane.
#[derive(Debug)]
pub(crate) struct TlsControlStream {
    stream: TlsStream<ControlStream>,
    info: TlsConnectInfo,
}

impl Connected for TlsControlStream {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        self.info.clone()
    }
}

crate::grpc::incoming::forward_io_to_stream!(TlsControlStream);

/// The TLS connections of an accept stream: a task takes each accepted
/// connection and spawns its handshake (at most [`HANDSHAKE_TIMEOUT`]);
/// the connections whose handshake succeeded come out of this stream. A
/// failed handshake is logged at debug level and closed. Dropping the
/// stream ends the task, which closes the listener.
pub(crate) struct TlsIncoming {
    ready: mpsc::Receiver<TlsControlStream>,
}

impl TlsIncoming {
    /// Accepts on `incoming` for `protocol` (`what` names the server in the log).
    pub(crate) fn new<S>(incoming: S, tls: &Tls, protocol: Protocol, what: &'static str) -> TlsIncoming
    where
        S: Stream<Item = io::Result<ControlStream>> + Unpin + Send + 'static,
    {
        let (sender, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(incoming, tls.clone(), protocol, sender, what));
        TlsIncoming { ready }
    }
}

async fn accept_loop<S>(
    mut incoming: S,
    tls: Tls,
    protocol: Protocol,
    sender: mpsc::Sender<TlsControlStream>,
    what: &'static str,
) where
    S: Stream<Item = io::Result<ControlStream>> + Unpin + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = incoming.next() => accepted,
            () = sender.closed() => return,
        };
        let stream = match accepted {
            Some(Ok(stream)) => stream,
            // The stream pauses after a failed accept itself.
            Some(Err(_)) => continue,
            None => return,
        };
        let remote = stream.connect_info().remote_addr();
        // The files in force now: a reload may have replaced them.
        let acceptor = tls.acceptor(protocol);
        let sender = sender.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(peer = ?remote, error = %e, "{what}: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = ?remote, "{what}: TLS handshake timed out");
                    return;
                }
            };
            let client_cert = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).map(cert_name);
            let info = TlsConnectInfo { remote, client_cert };
            let _ = sender.send(TlsControlStream { stream, info }).await;
        });
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsControlStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.ready.poll_recv(cx).map(|stream| stream.map(Ok))
    }
}

/// The name of a verified client certificate: its subject's CN, or
/// `sha256:` and the first 16 hex digits of its fingerprint.
fn cert_name(cert: &CertificateDer<'_>) -> String {
    match subject_common_name(cert) {
        Some(name) => name,
        None => {
            let digest = sha2::Sha256::digest(cert.as_ref());
            let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
    }
}

/// The subject's common name of a DER certificate (the first CN, as text,
/// control characters and quotes replaced, at most 64 characters), read
/// with a minimal DER walk: Certificate, TBSCertificate, the optional
/// version, serial number, signature algorithm, issuer, validity, then the
/// subject's RDNs.
pub(crate) fn subject_common_name(der: &[u8]) -> Option<String> {
    const COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];
    let (0x30, cert, _) = der_item(der)? else { return None };
    let (0x30, tbs, _) = der_item(cert)? else { return None };
    let mut rest = tbs;
    if let (0xa0, _, after) = der_item(rest)? {
        rest = after;
    }
    for _ in 0..4 {
        rest = der_item(rest)?.2;
    }
    let (0x30, mut rdns, _) = der_item(rest)? else { return None };
    while !rdns.is_empty() {
        let (0x31, mut attributes, next) = der_item(rdns)? else { return None };
        rdns = next;
        while !attributes.is_empty() {
            let (0x30, attribute, next) = der_item(attributes)? else { return None };
            attributes = next;
            let (0x06, oid, value) = der_item(attribute)? else { return None };
            if oid != COMMON_NAME {
                continue;
            }
            // UTF8String, PrintableString, TeletexString, IA5String.
            let (0x0c | 0x13 | 0x14 | 0x16, text, _) = der_item(value)? else { return None };
            let text = std::str::from_utf8(text).ok()?;
            let clean: String =
                text.chars().take(64).map(|c| if c.is_control() || c == '"' || c == '\\' { '?' } else { c }).collect();
            return (!clean.is_empty()).then_some(clean);
        }
    }
    None
}

/// One DER item: its tag, its contents, and what follows it.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |len, byte| (len << 8) | usize::from(*byte));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths() {
        assert_eq!(der_item(&[0x04, 0x02, 1, 2, 9]), Some((0x04, &[1u8, 2][..], &[9u8][..])));
        assert_eq!(der_item(&[0x04, 0x81, 0x01, 7]), Some((0x04, &[7u8][..], &[][..])));
        assert_eq!(der_item(&[0x04, 0x05, 1]), None);
        assert_eq!(subject_common_name(&[0x30, 0x00]), None);
    }
}
