//! One mail transaction on an open connection: MAIL, one RCPT per recipient, DATA and the
//! message, pipelined (RFC 2920) when the server offers it. Every reply is read before anything
//! is decided, so the session stays in step whatever the server answered, and a transaction that
//! did not end with the message accepted is closed with RSET, so the next one starts clean.

use std::task::Poll;

use super::{
    client::{Connection, Timeouts},
    message::Composed,
    reply::{Command, Reply, SmtpError},
};
use crate::address::{EnvelopeForm, Recipient};

/// What the server said to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    Replied(Reply),
    /// Never offered to the server: its address cannot be written for it (a UTF-8 local part
    /// without SMTPUTF8).
    Unsendable(String),
}

/// The replies of one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// The reply to MAIL FROM; `None` when no recipient could be offered at all.
    pub mail: Option<Reply>,
    /// One result per recipient, in the order given.
    pub rcpt: Vec<RcptResult>,
    /// The reply to DATA, when it was sent.
    pub data: Option<Reply>,
    /// The reply to the final dot, when the message was sent.
    pub end: Option<Reply>,
}

impl Transaction {
    /// Whether the server took the message for the recipients it accepted.
    pub fn delivered(&self) -> bool {
        self.end.as_ref().is_some_and(Reply::is_positive)
    }

    /// The relay said it is closing (421 to MAIL, see [`Reply::is_closing`]) before any message
    /// was handed over: another relay may take the message instead.
    pub fn closing(&self) -> Option<&Reply> {
        if self.end.is_some() {
            return None;
        }
        self.mail.as_ref().filter(|reply| reply.is_closing())
    }
}

/// Runs one transaction. On an error the connection is in an unknown state and must be dropped;
/// an error whose command is [`Command::DataEnd`] came after the message was handed over, so the
/// message may have been delivered.
///
/// `before_end` is awaited after the message's data is written and before its final `.` (or,
/// when it is ready at once, before both, which then go in one write), the
/// moment the server takes the message: a relay counts a message when its data ends, so that is
/// the moment a sending budget paces, and the last moment to check the letter is still ours.
/// `None` withdraws it: the connection is dropped without
/// the dot, so the server discards what it received ([`SmtpError::Withdrawn`]). `Some(limit)`
/// bounds the time the final `.` may take to write. It is not awaited when the transaction ends
/// earlier (every recipient refused).
pub async fn send(
    connection: &mut Connection,
    from: &str,
    recipients: &[Recipient],
    message: &Composed,
    timeouts: &Timeouts,
    before_end: impl Future<Output = Option<std::time::Duration>>,
) -> Result<Transaction, SmtpError> {
    if !connection.is_clean() {
        connection.reset(timeouts.short).await?;
    }
    let caps = &connection.capabilities;
    let (smtputf8, pipelining, eightbitmime, sized) =
        (caps.smtputf8, caps.pipelining, caps.eightbitmime, caps.size.is_some());
    let mut rcpt: Vec<RcptResult> = Vec::with_capacity(recipients.len());
    let mut offered = Vec::with_capacity(recipients.len());
    let mut utf8 = false;
    for (index, recipient) in recipients.iter().enumerate() {
        match recipient.envelope_form(smtputf8) {
            EnvelopeForm::Ascii(address) => offered.push((index, address)),
            EnvelopeForm::Utf8(address) => {
                utf8 = true;
                offered.push((index, address));
            }
            EnvelopeForm::Unsendable(reason) => {
                rcpt.push(RcptResult::Unsendable(reason));
                continue;
            }
        }
        // Placeholder, replaced by the server's reply below.
        rcpt.push(RcptResult::Unsendable(String::new()));
    }
    let mut transaction = Transaction { mail: None, rcpt, data: None, end: None };
    if offered.is_empty() {
        return Ok(transaction);
    }

    // Pieced together, not formatted: `format!` for these lines was ~2,800 instructions a letter.
    let mut mail = String::with_capacity(64 + from.len());
    mail.push_str("MAIL FROM:<");
    mail.push_str(from);
    mail.push('>');
    if sized {
        // Writing to a String cannot fail.
        let _ = std::fmt::Write::write_fmt(&mut mail, format_args!(" SIZE={}", message.len()));
    }
    if !message.is_ascii() && eightbitmime {
        mail.push_str(" BODY=8BITMIME");
    }
    if utf8 || !from.is_ascii() {
        mail.push_str(" SMTPUTF8");
    }
    let push_rcpt = |line: &mut String, address: &str| {
        line.push_str("RCPT TO:<");
        line.push_str(address);
        line.push_str(">\r\n");
    };

    connection.set_clean(false);
    if pipelining {
        let room = offered.iter().map(|(_, address)| address.len() + 13).sum::<usize>();
        let mut batch = String::with_capacity(mail.len() + room + 8);
        batch.push_str(&mail);
        batch.push_str("\r\n");
        for (_, address) in &offered {
            push_rcpt(&mut batch, address);
        }
        batch.push_str("DATA\r\n");
        connection.write(&batch, Command::MailFrom, timeouts.command, offered.len() as u64 + 2).await?;
        let mail_reply = connection.read_reply(Command::MailFrom, timeouts.command).await?;
        for (index, _) in &offered {
            let reply = connection.read_reply(Command::RcptTo, timeouts.command).await?;
            transaction.rcpt[*index] = RcptResult::Replied(reply);
        }
        transaction.data = Some(connection.read_reply(Command::Data, timeouts.data).await?);
        transaction.mail = Some(mail_reply);
    } else {
        let mail_reply = connection.command(&mail, Command::MailFrom, timeouts.command).await?;
        let accepted = mail_reply.is_positive();
        transaction.mail = Some(mail_reply);
        if !accepted {
            connection.set_clean(true);
            return Ok(transaction);
        }
        let mut any = false;
        for (index, address) in &offered {
            let mut line = String::with_capacity(address.len() + 13);
            push_rcpt(&mut line, address);
            connection.write(&line, Command::RcptTo, timeouts.command, 1).await?;
            let reply = connection.read_reply(Command::RcptTo, timeouts.command).await?;
            any |= reply.is_positive();
            transaction.rcpt[*index] = RcptResult::Replied(reply);
        }
        if any {
            transaction.data = Some(connection.command("DATA", Command::Data, timeouts.data).await?);
        }
    }

    let accepted = transaction.rcpt.iter().any(|r| matches!(r, RcptResult::Replied(reply) if reply.is_positive()));
    match &transaction.data {
        Some(data) if data.code == 354 && accepted => {
            let mut data = connection.take_data_buffer();
            write_data(&mut data, &message.parts());
            let mut before_end = std::pin::pin!(before_end);
            // When the dot may go at once (the budget far above the load, or the unit's moment
            // passed while the message was made), the message and its dot go in one write, a
            // system call and a segment fewer a letter (issue 23). Only a message the socket's buffer takes
            // whole, so the dot still goes within the write of its moment.
            let now = match data.len() <= ONE_WRITE_MAX {
                true => std::future::poll_fn(|cx| Poll::Ready(before_end.as_mut().poll(cx))).await,
                false => Poll::Pending,
            };
            // What is written before the wait: nothing, or all but the dot.
            let (written, limit) = match now {
                Poll::Ready(limit) => (0, limit),
                Poll::Pending => {
                    let body = data.len() - END_OF_DATA.len();
                    connection.write_bytes(&data[..body], Command::DataEnd, timeouts.data).await?;
                    (body, before_end.await)
                }
            };
            let Some(limit) = limit else {
                return Err(SmtpError::Withdrawn { server: connection.server().to_owned() });
            };
            connection.write_bytes(&data[written..], Command::DataEnd, limit.min(timeouts.data)).await?;
            connection.put_data_buffer(data);
            connection.commands_sent(1);
            transaction.end = Some(connection.read_reply(Command::DataEnd, timeouts.data_end).await?);
            // Whatever the reply, the transaction is over (RFC 5321 §4.1.1.4).
            connection.set_clean(true);
        }
        Some(data) if data.code == 354 => {
            // The server opened the data phase without any accepted recipient: there is no
            // message to give it, and no clean way to close the phase. Drop the connection.
            return Err(SmtpError::Protocol {
                command: Command::Data,
                server: connection.server().to_owned(),
                message: "the server accepted DATA without any recipient".into(),
            });
        }
        // MAIL, every RCPT or DATA refused: the transaction may still be open on the server
        // (Postfix keeps it and answers the next MAIL with 503), so close it.
        _ => connection.reset(timeouts.short).await?,
    }
    Ok(transaction)
}

/// The largest data phase written with its dot in one write when the dot may go at once: well
/// within a loopback or LAN socket's send buffer, so the write does not wait for the server.
const ONE_WRITE_MAX: usize = 64 * 1024;

/// The line that ends the data (RFC 5321 §4.1.1.4), last in [`write_data`]'s output.
const END_OF_DATA: &[u8] = b".\r\n";

/// Appends the message, the concatenation of `parts`, to `out` as it goes on the wire: lines
/// starting with a dot doubled (RFC 5321 §4.5.2), a CRLF if the message does not end with one,
/// and the final `.` line. The message's line ends are CRLF already (the composer made them so);
/// one pass copies the runs between the dots to double, part after part, so a letter's headers
/// and the body it shares with other letters go into the connection's buffer without being put
/// together first.
pub fn write_data(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    out.reserve(len + len / 64 + 5);
    // The message's last two octets so far; before the first, as after a line end, so a dot
    // first in the message, or first in a part after a part that ended a line, is doubled.
    let mut tail = *b"\r\n";
    for part in parts.iter().filter(|part| !part.is_empty()) {
        let mut start = 0;
        if tail[1] == b'\n' && part[0] == b'.' {
            out.push(b'.');
        }
        for newline in memchr::memmem::find_iter(part, b"\n.") {
            // Up to and including the dot, then the dot again.
            out.extend_from_slice(&part[start..newline + 2]);
            out.push(b'.');
            start = newline + 2;
        }
        out.extend_from_slice(&part[start..]);
        tail = match part {
            [only] => [tail[1], *only],
            [.., last_but_one, last] => [*last_but_one, *last],
            [] => tail,
        };
    }
    if len > 0 && tail != *b"\r\n" {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(END_OF_DATA);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn dot_stuffed(message: &[u8]) -> Vec<u8> {
        let mut out = b"kept".to_vec();
        write_data(&mut out, &[message]);
        assert_eq!(&out[..4], b"kept", "appends");
        out.split_off(4)
    }

    /// The dot-stuffing as it was before [`write_data`] (commit ab88d6a).
    pub(crate) fn dot_stuffed_before(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 5);
        let mut line_start = true;
        for &byte in message {
            if line_start && byte == b'.' {
                out.push(b'.');
            }
            out.push(byte);
            line_start = byte == b'\n';
        }
        if !message.is_empty() && !message.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    #[test]
    fn dot_stuffing_doubles_leading_dots_and_terminates() {
        assert_eq!(dot_stuffed(b"a\r\n.b\r\n..c\r\n"), b"a\r\n..b\r\n...c\r\n.\r\n");
        assert_eq!(dot_stuffed(b".start\r\nend"), b"..start\r\nend\r\n.\r\n");
        assert_eq!(dot_stuffed(b"x.y\r\n"), b"x.y\r\n.\r\n");
    }

    #[test]
    fn data_is_byte_for_byte_the_old_dot_stuffing() {
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b".".to_vec(),
            b"\n.".to_vec(),
            b"..\r\n.\r\n...\n.\r.\n\n.x".to_vec(),
            b"bare\rcr\nbare lf\n.dot after lf\r.dot after cr\r\n".to_vec(),
            "UTF-8 \u{436}\r\n.\u{436} dotted\r\n\u{1f44b}.".as_bytes().to_vec(),
            vec![0xe9, b'\n', b'.', 0xff, 0x00, b'\r', b'\n', b'.', b'.', 0x80],
            format!("{}\r\n.{}", "x".repeat(5_000), ".".repeat(3_000)).into_bytes(),
            (0..=255u8).cycle().take(10_000).collect(),
        ];
        for message in &cases {
            assert_eq!(dot_stuffed(message), dot_stuffed_before(message), "{:?}", String::from_utf8_lossy(message));
        }
        // Every message of up to 6 bytes over the bytes that matter.
        let alphabet = [b'.', b'\r', b'\n', b'a'];
        let mut compared = 0;
        for len in 0..=6u32 {
            for mut n in 0..alphabet.len().pow(len) {
                let mut message = Vec::new();
                for _ in 0..len {
                    message.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                assert_eq!(dot_stuffed(&message), dot_stuffed_before(&message), "{message:?}");
                compared += 1;
            }
        }
        assert_eq!(compared, 5461);
    }

    /// What the server reads after its 354 when the dot may go at once, comes later, or is
    /// withdrawn: each read until the dot (or the connection's end).
    async fn data_as_read(before_end: impl Future<Output = Option<std::time::Duration>>) -> (Vec<Vec<u8>>, bool) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let capabilities = crate::smtp::Capabilities { pipelining: true, ..Default::default() };
        let mut connection = crate::smtp::client::tests::connection_over(client, capabilities);
        let served = tokio::spawn(async move {
            let mut commands = Vec::new();
            let mut buf = vec![0; 256 * 1024];
            while !commands.ends_with(b"DATA\r\n") {
                let n = server.read(&mut buf).await.unwrap();
                commands.extend_from_slice(&buf[..n]);
            }
            server.write_all(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n").await.unwrap();
            let mut reads = Vec::new();
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    return reads;
                }
                reads.push(buf[..n].to_vec());
                if reads.concat().ends_with(b"\r\n.\r\n") {
                    server.write_all(b"250 2.0.0 queued\r\n").await.unwrap();
                    return reads;
                }
            }
        });
        let recipients = [Recipient::parse("a@example.com").unwrap()];
        let message = Composed::whole(format!("Subject: x\r\n\r\n{}\r\n.dot\r\n", "line\r\n".repeat(500)).into_bytes());
        let result =
            send(&mut connection, "s@example.com", &recipients, &message, &Timeouts::default(), before_end).await;
        let delivered = result.as_ref().is_ok_and(Transaction::delivered);
        if !delivered {
            assert!(matches!(result, Err(SmtpError::Withdrawn { .. })), "{result:?}");
        }
        drop(connection);
        (served.await.unwrap(), delivered)
    }

    /// A dot that may go at once goes in the message's own write (one system call, one segment);
    /// one that must wait goes after the message, when its moment comes; a withdrawn message is
    /// never ended.
    #[tokio::test]
    async fn the_dot_goes_with_the_message_when_it_may_go_at_once() {
        let (reads, delivered) = data_as_read(async { Some(std::time::Duration::from_secs(5)) }).await;
        assert!(delivered);
        assert_eq!(reads.len(), 1, "one write: {} reads", reads.len());
        assert!(reads[0].ends_with(b"\r\n..dot\r\n.\r\n"));

        let later = async {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            Some(std::time::Duration::from_secs(5))
        };
        let (reads, delivered) = data_as_read(later).await;
        assert!(delivered);
        assert!(reads.len() >= 2, "the message first, the dot at its moment: {} reads", reads.len());
        assert!(reads[0].ends_with(b"\r\n..dot\r\n"), "the message whole before the wait");
        assert_eq!(reads.last().unwrap(), b".\r\n");

        for withdrawn in [None, Some(200)] {
            let before_end = async move {
                if let Some(ms) = withdrawn {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                None
            };
            let (reads, delivered) = data_as_read(before_end).await;
            assert!(!delivered);
            assert!(!reads.concat().ends_with(b"\r\n.\r\n"), "never ended");
        }
    }

    /// A message written in parts is written as the same message in one piece: every message of
    /// up to 6 octets over the octets that matter, cut in two and in three at every place.
    #[test]
    fn data_in_parts_is_the_data_of_the_whole() {
        let alphabet = [b'.', b'\r', b'\n', b'a'];
        let mut compared = 0;
        for len in 0..=6usize {
            for mut n in 0..alphabet.len().pow(len as u32) {
                let mut message = Vec::new();
                for _ in 0..len {
                    message.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                let whole = dot_stuffed_before(&message);
                for first in 0..=len {
                    for second in first..=len {
                        let (a, rest) = message.split_at(first);
                        let (b, c) = rest.split_at(second - first);
                        let mut out = Vec::new();
                        write_data(&mut out, &[a, b, c]);
                        assert_eq!(out, whole, "{a:?} {b:?} {c:?}");
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 100_000, "{compared}");
        // A head that ends its lines, and bodies that begin with a dot or a line end.
        for (head, body) in
            [(&b"A: b\r\n\r\n"[..], &b".x\r\n.\r\n"[..]), (b"A: b\r\n\r", b"\n.x"), (b"A: b\r\n", b""), (b"", b".\r\n")]
        {
            let mut out = Vec::new();
            write_data(&mut out, &[head, body]);
            assert_eq!(out, dot_stuffed_before(&[head, body].concat()));
        }
    }
}
