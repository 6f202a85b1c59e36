//! One SMTP client connection: connect, greeting, EHLO, STARTTLS, AUTH, and the commands of a
//! session, each bounded by its own timeout (RFC 5321 §4.5.3.2).
//!
//! Written on tokio and rustls rather than lettre's `AsyncSmtpConnection`, which turns every
//! negative reply into an error carrying its text only in `Display`, bounds nothing but the
//! whole exchange, cannot write pipelined commands and reads no reply it did not ask for. The
//! part of SMTP a client needs is small; the TLS, certificates and address syntax stay with the
//! crates that do them well (rustls, webpki-roots, lettre).

use std::{
    fmt, io,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use base64::Engine as _;
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use secrecy::{ExposeSecret, SecretString};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf},
    net::TcpStream,
};

use super::reply::{Command, Reply, SmtpError};

/// How the connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text only, chosen explicitly; for a relay on the same host or a test sink.
    None,
    /// STARTTLS when the server offers it, plain text otherwise (what most MTAs do). Credentials
    /// are never sent without TLS in this mode.
    Opportunistic,
    /// STARTTLS is required; a server that does not offer it is an error.
    StartTls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

/// Per-phase timeouts, after RFC 5321 §4.5.3.2: minutes for the protocol phases, because a
/// busy relay may take that long, and up to ten for the reply to the final dot, when the
/// receiver does its real work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// The 220 greeting (RFC: 5 minutes).
    pub greeting: Duration,
    /// EHLO, STARTTLS (and its handshake), AUTH, MAIL and each RCPT (RFC: 5 minutes).
    pub command: Duration,
    /// The reply to DATA (RFC: 2 minutes), and writing the message (RFC: 3 minutes per block).
    pub data: Duration,
    /// The reply to the final dot (RFC: 10 minutes).
    pub data_end: Duration,
    /// RSET, NOOP and QUIT: a healthy server answers these at once.
    pub short: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(300),
            command: Duration::from_secs(300),
            data: Duration::from_secs(180),
            data_end: Duration::from_secs(600),
            short: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    /// The longest one transaction of `recipients` recipients can take on a kept connection,
    /// with a reconnection first: what a lease must outlast.
    pub fn worst_case_transaction(&self, recipients: usize) -> Duration {
        let connect = self.connect + self.greeting + self.command * 4 + self.short;
        connect + self.command * (1 + recipients as u32) + self.data * 2 + self.data_end
    }
}

/// What the SMTP client needs, and nothing of the worker that uses it.
#[derive(Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    pub helo_name: String,
    pub credentials: Option<(String, SecretString)>,
    pub timeouts: Timeouts,
    /// Counts every command line written, for the round-trip figures.
    pub commands: Counter,
    /// Counts connections opened.
    pub connections: Counter,
}

impl Settings {
    pub fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Builds the TLS configuration: the web PKI roots, plus an operator's private CA, or no
/// verification at all when the operator asked for that (tests only).
pub fn tls_config(ca_file: Option<&PathBuf>, insecure_skip_verify: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use anyhow::Context as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let config = if insecure_skip_verify {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider))).with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect)
                .with_context(|| format!("SMTP_TLS_CA_FILE {} is not a readable PEM certificate", path.display()))?;
            anyhow::ensure!(!certificates.is_empty(), "SMTP_TLS_CA_FILE {} holds no certificate", path.display());
            for certificate in certificates {
                roots.add(certificate).with_context(|| format!("SMTP_TLS_CA_FILE {}", path.display()))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// `SMTP_TLS_INSECURE_SKIP_VERIFY`: accepts any certificate, still checking the handshake's
/// signatures so the session is at least encrypted.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What the server said it can do in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    pub smtputf8: bool,
    pub eightbitmime: bool,
    pub auth: Vec<String>,
    /// The largest message the server takes (SIZE, RFC 1870); 0 or absent means no limit given.
    pub size: Option<u64>,
}

impl Capabilities {
    fn parse(lines: &[String]) -> Capabilities {
        let mut caps = Capabilities::default();
        // The first line is the server's name, not a keyword.
        for line in lines.iter().skip(1) {
            let text = line.get(4..).unwrap_or_default().trim();
            let mut words = text.split_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "STARTTLS" => caps.starttls = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "8BITMIME" => caps.eightbitmime = true,
                "AUTH" => caps.auth = words.map(str::to_ascii_uppercase).collect(),
                "SIZE" => caps.size = words.next().and_then(|s| s.parse().ok()).filter(|s| *s > 0),
                _ => {}
            }
        }
        caps
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Longest reply line accepted (RFC 5321 §4.5.3.1.5 allows 512 octets; relays write longer).
const MAX_REPLY_LINE: u64 = 8192;

/// An open, greeted (and, as configured, encrypted and authenticated) SMTP session.
pub struct Connection {
    stream: BufReader<Stream>,
    pub capabilities: Capabilities,
    encrypted: bool,
    server: String,
    commands: Counter,
    last_used: Instant,
    /// False while a transaction may be open or a reply may be unread: the connection must be
    /// reset (or dropped) before the next transaction.
    clean: bool,
    /// The message's data as it goes on the wire, kept between transactions: a connection then
    /// writes each message into memory it already has.
    data: Vec<u8>,
}

/// A data buffer larger than this is not kept for the next message: a single big letter would
/// otherwise hold its size per connection for the connection's life.
const KEPT_DATA_BUFFER: usize = 256 * 1024;

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").field("server", &self.server).field("encrypted", &self.encrypted).finish()
    }
}

impl Connection {
    /// Connects and prepares a session as `settings` ask: TLS first or by STARTTLS, EHLO, and
    /// AUTH only over TLS unless the operator chose `SMTP_TLS=none`.
    pub async fn connect(settings: &Settings) -> Result<Connection, SmtpError> {
        let server = settings.server();
        let t = &settings.timeouts;
        settings.connections.inc();
        let io = |command, source| SmtpError::Io { command, server: server.clone(), source };
        let tcp =
            bounded(Command::Connect, &server, t.connect, TcpStream::connect((settings.host.as_str(), settings.port)))
                .await?
                .map_err(|e| io(Command::Connect, e))?;
        // Each message ends with a short write (the final dot); without TCP_NODELAY it would wait
        // for the delayed ACK of the previous segment, about 40 ms a letter.
        tcp.set_nodelay(true).map_err(|e| io(Command::Connect, e))?;
        let (stream, encrypted) = match (settings.tls, &settings.tls_config) {
            (TlsMode::Implicit, Some(config)) => (Stream::Tls(Box::new(handshake(settings, config, tcp).await?)), true),
            _ => (Stream::Plain(tcp), false),
        };
        let mut connection = Connection {
            stream: BufReader::new(stream),
            capabilities: Capabilities::default(),
            encrypted,
            server: server.clone(),
            commands: settings.commands.clone(),
            last_used: Instant::now(),
            clean: true,
            data: Vec::new(),
        };
        let greeting = connection.read_reply(Command::Greeting, t.greeting).await?;
        if !greeting.is_positive() {
            return Err(SmtpError::Refused { reply: greeting, server });
        }
        connection.ehlo(settings).await?;

        let wants_tls = matches!(settings.tls, TlsMode::Opportunistic | TlsMode::StartTls);
        if wants_tls && !connection.encrypted {
            match (&settings.tls_config, connection.capabilities.starttls) {
                (Some(config), true) => {
                    let reply = connection.command("STARTTLS", Command::StartTls, t.command).await?;
                    if !reply.is_positive() {
                        return Err(SmtpError::Refused { reply, server });
                    }
                    // RFC 3207 §4.2: anything the server sent after its 220 came before the
                    // handshake and cannot be trusted (a STARTTLS command injection).
                    if !connection.stream.buffer().is_empty() {
                        return Err(SmtpError::Protocol {
                            command: Command::StartTls,
                            server,
                            message: "the server sent data before the TLS handshake".into(),
                        });
                    }
                    let Stream::Plain(tcp) = connection.stream.into_inner() else {
                        unreachable!("a connection is encrypted once at most")
                    };
                    connection.stream = BufReader::new(Stream::Tls(Box::new(handshake(settings, config, tcp).await?)));
                    connection.encrypted = true;
                    connection.ehlo(settings).await?;
                }
                _ if settings.tls == TlsMode::StartTls => {
                    return Err(SmtpError::Policy(format!(
                        "{server} does not offer STARTTLS, which SMTP_TLS=starttls requires"
                    )));
                }
                _ => {}
            }
        }
        if let Some((user, password)) = &settings.credentials {
            if !connection.encrypted && settings.tls != TlsMode::None {
                return Err(SmtpError::Policy(format!(
                    "{server} offers no STARTTLS, so AUTH would send SMTP_PASSWORD in clear text; nothing was sent. \
                     Use the relay's TLS port (SMTP_TLS=implicit, usually port 465, or SMTP_TLS=starttls on 587), \
                     or set SMTP_TLS=none to allow plain-text credentials on a trusted network"
                )));
            }
            connection.authenticate(user, password, t.command).await?;
        }
        tracing::debug!(
            server = %connection.server,
            encrypted = connection.encrypted,
            pipelining = connection.capabilities.pipelining,
            smtputf8 = connection.capabilities.smtputf8,
            "SMTP connection ready"
        );
        Ok(connection)
    }

    async fn ehlo(&mut self, settings: &Settings) -> Result<(), SmtpError> {
        self.write(&format!("EHLO {}\r\n", settings.helo_name), Command::Ehlo, settings.timeouts.command, 1).await?;
        let (reply, lines) = self.read_reply_lines(Command::Ehlo, settings.timeouts.command).await?;
        if !reply.is_positive() {
            return Err(SmtpError::Refused { reply, server: self.server.clone() });
        }
        self.capabilities = Capabilities::parse(&lines);
        Ok(())
    }

    async fn authenticate(&mut self, user: &str, password: &SecretString, timeout: Duration) -> Result<(), SmtpError> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mechanisms = &self.capabilities.auth;
        let reply = if mechanisms.iter().any(|m| m == "PLAIN") {
            let token = b64(&format!("\0{user}\0{}", password.expose_secret()));
            self.command(&format!("AUTH PLAIN {token}"), Command::Auth, timeout).await?
        } else if mechanisms.iter().any(|m| m == "LOGIN") {
            let mut reply = self.command("AUTH LOGIN", Command::Auth, timeout).await?;
            if reply.code == 334 {
                reply = self.command(&b64(user), Command::Auth, timeout).await?;
            }
            if reply.code == 334 {
                reply = self.command(&b64(password.expose_secret()), Command::Auth, timeout).await?;
            }
            reply
        } else {
            return Err(SmtpError::Policy(format!(
                "{} offers no AUTH mechanism this client speaks (PLAIN or LOGIN); offered: {:?}",
                self.server, mechanisms
            )));
        };
        if reply.code != 235 {
            return Err(SmtpError::Refused { reply, server: self.server.clone() });
        }
        Ok(())
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// How long the connection has been idle.
    pub fn idle(&self) -> Duration {
        self.last_used.elapsed()
    }

    pub fn is_clean(&self) -> bool {
        self.clean
    }

    pub(super) fn set_clean(&mut self, clean: bool) {
        self.clean = clean;
    }

    /// Writes one command and reads its reply. A negative reply is a value, not an error.
    pub async fn command(&mut self, line: &str, command: Command, timeout: Duration) -> Result<Reply, SmtpError> {
        self.write(&format!("{line}\r\n"), command, timeout, 1).await?;
        self.read_reply(command, timeout).await
    }

    /// Writes bytes that hold `count` commands (several when pipelining) in one write.
    pub async fn write(
        &mut self,
        data: &str,
        command: Command,
        timeout: Duration,
        count: u64,
    ) -> Result<(), SmtpError> {
        self.write_bytes(data.as_bytes(), command, timeout).await?;
        self.commands.inc_by(count);
        Ok(())
    }

    /// The connection's data buffer, empty; [`Connection::put_data_buffer`] gives it back.
    pub(super) fn take_data_buffer(&mut self) -> Vec<u8> {
        let mut buffer = std::mem::take(&mut self.data);
        buffer.clear();
        buffer
    }

    pub(super) fn put_data_buffer(&mut self, buffer: Vec<u8>) {
        if buffer.capacity() <= KEPT_DATA_BUFFER {
            self.data = buffer;
        }
    }

    /// Counts commands written through [`Connection::write_bytes`].
    pub fn commands_sent(&self, count: u64) {
        self.commands.inc_by(count);
    }

    pub async fn write_bytes(&mut self, data: &[u8], command: Command, timeout: Duration) -> Result<(), SmtpError> {
        self.last_used = Instant::now();
        let server = self.server.clone();
        let stream = self.stream.get_mut();
        bounded(command, &server, timeout, async {
            stream.write_all(data).await?;
            stream.flush().await
        })
        .await?
        .map_err(|source| SmtpError::Io { command, server, source })
    }

    pub async fn read_reply(&mut self, command: Command, timeout: Duration) -> Result<Reply, SmtpError> {
        Ok(self.read_reply_lines(command, timeout).await?.0)
    }

    async fn read_reply_lines(
        &mut self,
        command: Command,
        timeout: Duration,
    ) -> Result<(Reply, Vec<String>), SmtpError> {
        // A reply is read several times per letter: one allocation per line, and the server's
        // name copied only into an error (issue 23).
        if let Some(lines) = self.buffered_reply() {
            return self.parsed(command, lines);
        }
        let stream = &mut self.stream;
        let lines = bounded(command, &self.server, timeout, async {
            let mut lines = Vec::with_capacity(1);
            loop {
                let mut raw = Vec::with_capacity(64);
                let read = (&mut *stream).take(MAX_REPLY_LINE).read_until(b'\n', &mut raw).await?;
                if read == 0 {
                    return Ok(None);
                }
                let (line, last) = reply_line(raw);
                lines.push(line);
                if last {
                    return Ok(Some(lines));
                }
            }
        })
        .await?
        .map_err(|source| SmtpError::Io { command, server: self.server.clone(), source })?;
        let Some(lines) = lines else { return Err(SmtpError::Closed { command, server: self.server.clone() }) };
        self.parsed(command, lines)
    }

    /// A whole reply that is in the read buffer already, taken without a read or a timer: the
    /// replies to a pipelined group arrive together, so all but the first are there (the timer
    /// of each was ~1,000 instructions, issue 23). `None` when a line is incomplete or longer
    /// than a line may be; the reply is then read as any other.
    fn buffered_reply(&mut self) -> Option<Vec<String>> {
        let buffer = self.stream.buffer();
        let mut lines = Vec::with_capacity(1);
        let mut start = 0;
        loop {
            let end = start + buffer[start..].iter().position(|&b| b == b'\n')?;
            if (end + 1 - start) as u64 > MAX_REPLY_LINE {
                return None;
            }
            let (line, last) = reply_line(buffer[start..=end].to_vec());
            lines.push(line);
            start = end + 1;
            if last {
                std::pin::Pin::new(&mut self.stream).consume(start);
                return Some(lines);
            }
        }
    }

    fn parsed(&mut self, command: Command, lines: Vec<String>) -> Result<(Reply, Vec<String>), SmtpError> {
        self.last_used = Instant::now();
        let reply = Reply::parse(&lines, command).map_err(|message| SmtpError::Protocol {
            command,
            server: self.server.clone(),
            message,
        })?;
        Ok((reply, lines))
    }

    /// RSET: ends whatever transaction is open, so the connection can carry the next one.
    pub async fn reset(&mut self, timeout: Duration) -> Result<(), SmtpError> {
        let reply = self.command("RSET", Command::Rset, timeout).await?;
        if !reply.is_positive() {
            return Err(SmtpError::Refused { reply, server: self.server.clone() });
        }
        self.clean = true;
        Ok(())
    }

    /// NOOP: whether a connection that sat idle still works (a NAT or the server's idle timeout
    /// may have dropped it meanwhile; a server closing for idleness answers 421 first).
    pub async fn check(&mut self, timeout: Duration) -> Result<(), SmtpError> {
        let reply = self.command("NOOP", Command::Noop, timeout).await?;
        if !reply.is_positive() {
            return Err(SmtpError::Refused { reply, server: self.server.clone() });
        }
        Ok(())
    }

    /// Ends the session politely, within `timeout`.
    pub async fn quit(mut self, timeout: Duration) {
        let _ = self.command("QUIT", Command::Quit, timeout).await;
        let _ = tokio::time::timeout(timeout, self.stream.get_mut().shutdown()).await;
    }
}

async fn handshake(
    settings: &Settings,
    config: &Arc<rustls::ClientConfig>,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SmtpError> {
    let server = settings.server();
    let name = ServerName::try_from(settings.host.clone())
        .map_err(|e| SmtpError::Tls { server: server.clone(), message: format!("invalid server name: {e}") })?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    bounded(Command::StartTls, &server, settings.timeouts.command, connector.connect(name, tcp))
        .await?
        .map_err(|e| SmtpError::Tls { server, message: e.to_string() })
}

/// A reply line as read, its CR/LF taken off, and whether it is its reply's last (no `-` after
/// the code); one allocation, the line's own.
fn reply_line(mut raw: Vec<u8>) -> (String, bool) {
    while raw.last().is_some_and(|b| matches!(b, b'\r' | b'\n')) {
        raw.pop();
    }
    let line = String::from_utf8(raw).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    let last = line.as_bytes().get(3) != Some(&b'-');
    (line, last)
}

/// Runs `future` within `timeout`, naming the phase when it does not finish.
async fn bounded<T>(
    command: Command,
    server: &str,
    timeout: Duration,
    future: impl Future<Output = T>,
) -> Result<T, SmtpError> {
    tokio::time::timeout(timeout, future).await.map_err(|_| SmtpError::Timeout {
        command,
        server: server.to_owned(),
        after: timeout,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn ehlo_keywords_are_read() {
        let lines: Vec<String> = [
            "250-relay.example.org Hello",
            "250-PIPELINING",
            "250-SIZE 35882577",
            "250-AUTH LOGIN PLAIN XOAUTH2",
            "250-8BITMIME",
            "250-STARTTLS",
            "250 SMTPUTF8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let caps = Capabilities::parse(&lines);
        assert!(caps.pipelining && caps.starttls && caps.smtputf8 && caps.eightbitmime);
        assert_eq!(caps.auth, vec!["LOGIN", "PLAIN", "XOAUTH2"]);
        assert_eq!(caps.size, Some(35_882_577));
        assert_eq!(Capabilities::parse(&lines[..1]), Capabilities::default());
    }

    /// A plain connection over `client`, as if its greeting and EHLO had been read, for tests that
    /// play the server on the other end.
    pub(crate) fn connection_over(client: TcpStream, capabilities: Capabilities) -> Connection {
        Connection {
            stream: BufReader::new(Stream::Plain(client)),
            capabilities,
            encrypted: false,
            server: "test".to_owned(),
            commands: Counter::default(),
            last_used: Instant::now(),
            clean: true,
            data: Vec::new(),
        }
    }

    /// Replies that arrive together are taken from the buffer, one that arrives in pieces is
    /// read whole, and a reply that never comes still times out.
    #[tokio::test]
    async fn pipelined_replies_are_taken_whole_from_the_buffer() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut connection = connection_over(client, Capabilities::default());
        let wait = Duration::from_secs(5);
        server.write_all(b"250 2.1.0 one\r\n250-two a\r\r\n250 two b\r\n452 4.5.3 three\n354 go").await.unwrap();
        let first = connection.read_reply_lines(Command::MailFrom, wait).await.unwrap();
        assert_eq!((first.0.code, first.0.text.as_str(), first.1), (250, "one", vec!["250 2.1.0 one".to_owned()]));
        assert!(connection.stream.buffer().starts_with(b"250-two"), "the rest is buffered");
        let second = connection.read_reply_lines(Command::RcptTo, wait).await.unwrap();
        assert_eq!((second.0.text.as_str(), second.1), ("two a two b", vec!["250-two a".into(), "250 two b".into()]));
        let third = connection.read_reply(Command::RcptTo, wait).await.unwrap();
        assert_eq!((third.code, third.text.as_str()), (452, "three"));
        let rest = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            server.write_all(b" ahead\r\n").await.unwrap();
            server
        });
        let fourth = connection.read_reply_lines(Command::Data, wait).await.unwrap();
        assert_eq!(fourth.1, vec!["354 go ahead".to_owned()]);
        let _server = rest.await.unwrap();
        let silent = connection.read_reply(Command::DataEnd, Duration::from_millis(50)).await;
        assert!(matches!(silent, Err(SmtpError::Timeout { .. })), "{silent:?}");
    }

    #[test]
    fn worst_case_covers_every_phase() {
        let t = Timeouts::default();
        assert!(t.worst_case_transaction(50) > t.data_end + t.command * 50);
    }
}
