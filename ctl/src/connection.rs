//! The way to the daemon and what to say when it fails: the control
//! address, connecting with bounded waits, and the mapping of every error to
//! one line on stderr and an exit code.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::time::Duration;

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, ClientTlsConfig, Endpoint, Identity},
};

const DEFAULT_CONTROL: &str = "127.0.0.1:50051";
const CONTROL_ENV: &str = "ASYNCORED_CONTROL";
const TOKEN_ENV: &str = "ASYNCORED_TOKEN";

/// A connection to the daemon: every call carries the bearer token, if
/// one was given.
pub(crate) type Channel = InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization: Bearer SECRET` to every call.
#[derive(Clone, Default)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.write_str(if self.0.is_some() { "Bearer(..)" } else { "Bearer(none)" })
    }
}

impl PartialEq for Bearer {
    fn eq(&self, other: &Bearer) -> bool {
        self.0.as_ref().map(MetadataValue::as_bytes) == other.0.as_ref().map(MetadataValue::as_bytes)
    }
}

impl Eq for Bearer {}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The token from `--token-file`, else `ASYNCORED_TOKEN`, else none. The
/// file is either the daemon's token file (the secret of its first token,
/// `name level secret`, is used) or a file holding the secret alone.
///
/// # Errors
///
/// A [`Refused`] naming the file, when it cannot be read or holds no
/// token, or the token is not printable ASCII; never the secret itself.
pub(crate) fn bearer(token_file: Option<&std::path::Path>) -> Result<Bearer, Refused> {
    let secret = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| {
                Refused(format!("cannot read the token file {}: {}", path.display(), io_error_text(&error)))
            })?;
            let line = text.lines().map(str::trim).find(|line| !line.is_empty() && !line.starts_with('#'));
            let secret = line.and_then(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields[..] {
                    [secret] | [_, _, secret] => Some(secret.to_owned()),
                    _ => None,
                }
            });
            Some(secret.ok_or_else(|| {
                Refused(format!("token file {}: expected a secret alone, or lines `name level secret`", path.display()))
            })?)
        }
        None => std::env::var(TOKEN_ENV).ok().map(|value| value.trim().to_owned()).filter(|value| !value.is_empty()),
    };
    match secret {
        None => Ok(Bearer(None)),
        Some(secret) => format!("Bearer {secret}")
            .parse()
            .map(|value| Bearer(Some(value)))
            .map_err(|_| Refused("the token has characters a header cannot carry".to_owned())),
    }
}

/// Bounds the TCP connect (or `--timeout`, if shorter). The whole connect,
/// HTTP/2 handshake included, and each call until its response headers are
/// bounded by `--timeout` ([`DEFAULT_TIMEOUT`]): tonic only sends the HTTP/2
/// preface while connecting, so a peer that accepts and then says nothing
/// (a wrong port, a daemon that cannot answer) is only noticed by the call.
/// Streaming calls are bounded until their first headers only, so `stats`
/// can run for as long as the user wants.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `--timeout` when not given.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) const EXIT_FAILURE: u8 = 1;
/// clap's own code for usage errors, which [`Refused`] shares.
pub(crate) const EXIT_USAGE: u8 = 2;
pub(crate) const EXIT_UNREACHABLE: u8 = 3;

/// The daemon's address as the user wrote it (for messages) and as a URI
/// (for tonic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ControlTarget {
    shown: String,
    uri: String,
    /// How long to wait for it: to connect, and for each answer to begin.
    timeout: Duration,
    /// The token every call carries.
    bearer: Bearer,
    /// TLS (an `https://` address): the files, checked.
    tls: Option<TlsFiles>,
}

/// `--ca`, `--client-cert` and `--client-key`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) ca: Option<PathBuf>,
    pub(crate) client_cert: Option<PathBuf>,
    pub(crate) client_key: Option<PathBuf>,
}

/// A PEM file's bytes, checked to hold at least one item of its kind.
fn pem_file(what: &str, path: &Path, certificate: bool) -> Result<Vec<u8>, Refused> {
    let bytes = std::fs::read(path)
        .map_err(|error| Refused(format!("cannot read the {what} {}: {}", path.display(), io_error_text(&error))))?;
    let found = if certificate {
        CertificateDer::pem_slice_iter(&bytes).next().is_some_and(|cert| cert.is_ok())
    } else {
        PrivateKeyDer::from_pem_slice(&bytes).is_ok()
    };
    if !found {
        let item = if certificate { "certificate" } else { "private key" };
        return Err(Refused(format!("{what} {}: no PEM {item} in it", path.display())));
    }
    Ok(bytes)
}

impl ControlTarget {
    /// The same daemon, waited for `timeout`.
    pub(crate) fn with_timeout(self, timeout: Duration) -> ControlTarget {
        ControlTarget { timeout, ..self }
    }

    /// The same daemon, reached with this token.
    pub(crate) fn with_bearer(self, bearer: Bearer) -> ControlTarget {
        ControlTarget { bearer, ..self }
    }

    /// How long it is waited for.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same daemon over TLS when `files` name a CA or a client
    /// certificate (a `host:port` address becomes `https://host:port`).
    ///
    /// # Errors
    ///
    /// A [`Refused`] when TLS files go with a `unix:` or `http://`
    /// address, an `https://` address comes without `--ca`, or a file
    /// cannot be read or holds no PEM item of its kind.
    pub(crate) fn with_tls(self, files: TlsFiles) -> Result<ControlTarget, Refused> {
        let wanted = files != TlsFiles::default();
        let https = self.uri.starts_with("https://");
        if !wanted && !https {
            return Ok(self);
        }
        if self.uri.starts_with("unix:") || self.shown.starts_with("http://") {
            return Err(Refused(format!(
                "--ca, --client-cert and --client-key are for https://host:port addresses, not {}",
                self.shown
            )));
        }
        if files.ca.is_none() {
            return Err(Refused(format!(
                "{} is reached over TLS: give --ca FILE, the CA that signed the daemon's certificate",
                self.shown
            )));
        }
        for (what, path, certificate) in [
            ("CA file", &files.ca, true),
            ("client certificate", &files.client_cert, true),
            ("client key", &files.client_key, false),
        ] {
            if let Some(path) = path {
                pem_file(what, path, certificate)?;
            }
        }
        let uri = if https { self.uri } else { self.uri.replacen("http://", "https://", 1) };
        Ok(ControlTarget { uri, tls: Some(files), ..self })
    }

    /// tonic's TLS settings of [`TlsFiles`] (checked by
    /// [`with_tls`](ControlTarget::with_tls)).
    fn tls_config(&self) -> Result<Option<ClientTlsConfig>, Refused> {
        let Some(files) = &self.tls else { return Ok(None) };
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &files.ca {
            config = config.ca_certificate(Certificate::from_pem(pem_file("CA file", ca, true)?));
        }
        if let (Some(cert), Some(key)) = (&files.client_cert, &files.client_key) {
            let cert = pem_file("client certificate", cert, true)?;
            let key = pem_file("client key", key, false)?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        Ok(Some(config))
    }
}

/// The daemon did not answer: the connect failed, or the connection broke or
/// timed out before a reply. As opposed to the daemon answering with an
/// error, it gets its own exit code so scripts can tell "down" from "no".
#[derive(Debug)]
struct Unreachable {
    address: String,
    reason: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot reach the daemon at {}: {}", self.address, self.reason)
    }
}

impl StdError for Unreachable {}

/// A request refused before anything was done, for a reason clap cannot
/// check (a directory that is not empty, a name Cargo would refuse): exit
/// code 2 like clap's usage errors, but one line, since the usage text
/// would not help.
#[derive(Debug)]
pub(crate) struct Refused(pub(crate) String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Refused {}

/// The control address from `--control`, else `ASYNCORED_CONTROL`, else the
/// default.
pub(crate) fn control_address(flag: Option<String>) -> String {
    flag
        // An empty variable counts as unset, as `ASYNCORED_CONTROL= cmd` means.
        .or_else(|| std::env::var(CONTROL_ENV).ok().filter(|value| !value.is_empty()))
        .unwrap_or_else(|| DEFAULT_CONTROL.to_owned())
}

/// Turns `host:port`, `http://host:port`, `https://host:port` (a daemon
/// started with `--tls-cert`) or `unix:PATH` (a daemon started with
/// `--control unix:PATH`) into the URI tonic wants.
pub(crate) fn control_target(address: &str) -> Result<ControlTarget, String> {
    let uri = match address.split_once("://") {
        Some(("http" | "https", _)) => address.to_owned(),
        _ if address.starts_with("unix:") => address.to_owned(),
        Some((scheme, _)) => {
            return Err(format!(
                "control address {address:?}: scheme {scheme}:// is not supported, use host:port, http://host:port \
                 or https://host:port"
            ));
        }
        None => format!("http://{address}"),
    };
    Endpoint::from_shared(uri.clone())
        .map_err(|_| format!("control address {address:?} is not valid, expected host:port or http://host:port"))?;
    Ok(ControlTarget { shown: address.to_owned(), uri, timeout: DEFAULT_TIMEOUT, bearer: Bearer::default(), tls: None })
}

pub(crate) async fn connect(target: &ControlTarget) -> anyhow::Result<Channel> {
    let unreachable = |reason: String| Unreachable { address: target.shown.clone(), reason };
    let mut endpoint = Endpoint::from_shared(target.uri.clone())
        .map_err(|error| unreachable(root_cause_text(&error)))?
        .connect_timeout(CONNECT_TIMEOUT.min(target.timeout))
        .timeout(target.timeout);
    if let Some(tls) = target.tls_config()? {
        endpoint =
            endpoint.tls_config(tls).map_err(|error| unreachable(format!("TLS: {}", root_cause_text(&error))))?;
    }
    match tokio::time::timeout(target.timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(InterceptedService::new(channel, target.bearer.clone())),
        Ok(Err(error)) => Err(unreachable(reason(&error, target)).into()),
        Err(_elapsed) => Err(unreachable(no_answer(target)).into()),
    }
}

/// What to say of a daemon that did not answer in time.
fn no_answer(target: &ControlTarget) -> String {
    format!("no answer within {} (--timeout)", duration_text(target.timeout))
}

/// `10s`, `1500ms`: the grammar `--timeout` takes.
fn duration_text(duration: Duration) -> String {
    match duration.as_millis() {
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// Why a connect or a call failed in the transport: a timeout in the
/// words of `--timeout`, else the innermost cause. A plain client that
/// reads a TLS alert as HTTP/2 sees a frame of an invalid size: then the
/// daemon probably serves TLS, and the line says so.
fn reason(error: &(dyn StdError + 'static), target: &ControlTarget) -> String {
    let mut cause = error;
    loop {
        if cause.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return no_answer(target);
        }
        match cause.source() {
            Some(source) => cause = source,
            None => break,
        }
    }
    let text = root_cause_text(error);
    if target.tls.is_none() && !target.uri.starts_with("unix:") && text.contains("frame with invalid size") {
        format!("{text} (does the daemon serve TLS? give --ca FILE)")
    } else {
        text
    }
}

/// A call that failed in the transport (connection reset, peer closed, timed
/// out) yields a `Status` that tonic made up on our side; unlike a status
/// the daemon sent, it carries the transport error as its source. Either way
/// the daemon did not answer, so it is reported like a failed connect.
pub(crate) fn transport_failure_as_unreachable(error: anyhow::Error, target: &ControlTarget) -> anyhow::Error {
    match error.downcast::<tonic::Status>() {
        Ok(status) if status.source().is_some() => {
            Unreachable { address: target.shown.clone(), reason: reason(&status, target) }.into()
        }
        Ok(status) => status.into(),
        Err(error) => error,
    }
}

/// The innermost cause of a transport error, which is the useful part:
/// tonic's own layers only say "transport error".
fn root_cause_text(error: &(dyn StdError + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    match cause.downcast_ref::<io::Error>() {
        Some(io_error) => io_error_text(io_error),
        None => cause.to_string(),
    }
}

/// "Connection refused (os error 111)" becomes "connection refused", to
/// match the lowercase style of every other message we print.
pub(crate) fn io_error_text(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" (os error ") {
        Some(index) if text.ends_with(')') => &text[..index],
        _ => &text,
    };
    lowercase_first(text)
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The one line printed after `asyncorectl: ` for a failed command.
pub(crate) fn describe_error(error: &anyhow::Error) -> String {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) if status.message().is_empty() => code_name(status.code()).to_owned(),
        Some(status) => format!("{}: {}", code_name(status.code()), status.message()),
        None => format!("{error:#}"),
    }
}

pub(crate) fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Unreachable>().is_some() {
        EXIT_UNREACHABLE
    } else if error.downcast_ref::<Refused>().is_some() {
        EXIT_USAGE
    } else {
        EXIT_FAILURE
    }
}

pub(crate) fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.downcast_ref::<io::Error>().is_some_and(|io_error| io_error.kind() == io::ErrorKind::BrokenPipe)
}

/// The gRPC code as lowercase words, as in `not found: no channel 42`.
/// tonic's `Display` for `Code` is a sentence, and its `Debug` is CamelCase.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_addresses() {
        assert_eq!(control_target("127.0.0.1:50051").map(|target| target.uri), Ok("http://127.0.0.1:50051".to_owned()));
        assert_eq!(control_target("http://[::1]:7000").map(|target| target.uri), Ok("http://[::1]:7000".to_owned()));
        assert_eq!(control_target("https://example:1").map(|target| target.uri), Ok("https://example:1".to_owned()));
        assert!(control_target("ftp://example:1").is_err());
        let needs_ca = control_target("https://example:1").unwrap().with_tls(TlsFiles::default()).unwrap_err();
        assert!(needs_ca.0.contains("--ca"), "{needs_ca}");
        let files = TlsFiles { ca: Some("/nonexistent/ca.pem".into()), ..TlsFiles::default() };
        let unix = control_target("unix:/run/c.sock").unwrap().with_tls(files.clone()).unwrap_err();
        assert!(unix.0.contains("https://"), "{unix}");
        let missing = control_target("127.0.0.1:1").unwrap().with_tls(files).unwrap_err();
        assert!(missing.0.contains("cannot read the CA file /nonexistent/ca.pem"), "{missing}");
        assert!(control_target("not a host").is_err());
    }

    #[test]
    fn status_errors_name_their_code() {
        let error = anyhow::Error::from(tonic::Status::not_found("no channel 42"));
        assert_eq!(describe_error(&error), "not found: no channel 42");
        assert_eq!(exit_code(&error), EXIT_FAILURE);
    }

    #[test]
    fn refusals_are_usage_errors() {
        let error = anyhow::Error::from(Refused("plugin name \"9\" must start with a letter".to_owned()));
        assert_eq!(describe_error(&error), "plugin name \"9\" must start with a letter");
        assert_eq!(exit_code(&error), EXIT_USAGE);
    }

    #[test]
    fn transport_statuses_are_unreachable() {
        let target = control_target("127.0.0.1:1").unwrap();
        let mut status = tonic::Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "Connection reset by peer (os error 104)",
        )));
        let error = transport_failure_as_unreachable(status.into(), &target);
        assert_eq!(exit_code(&error), EXIT_UNREACHABLE);
        assert_eq!(describe_error(&error), "cannot reach the daemon at 127.0.0.1:1: connection reset by peer");

        status = tonic::Status::unavailable("daemon draining");
        let error = transport_failure_as_unreachable(status.into(), &target);
        assert_eq!(exit_code(&error), EXIT_FAILURE);
        assert_eq!(describe_error(&error), "unavailable: daemon draining");
    }

    #[test]
    fn timeouts_name_the_flag() {
        let target = control_target("127.0.0.1:1").unwrap().with_timeout(Duration::from_millis(1500));
        let status = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        let error = transport_failure_as_unreachable(status.into(), &target);
        assert_eq!(exit_code(&error), EXIT_UNREACHABLE);
        assert_eq!(
            describe_error(&error),
            "cannot reach the daemon at 127.0.0.1:1: no answer within 1500ms (--timeout)"
        );
        assert_eq!(duration_text(Duration::from_secs(10)), "10s");
    }

    #[test]
    fn io_errors_lose_the_os_error_suffix() {
        let error = io::Error::other("Connection refused (os error 111)");
        assert_eq!(io_error_text(&error), "connection refused");
    }
}
