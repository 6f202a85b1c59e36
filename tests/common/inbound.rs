//! Talking to the feedback listener as an MTA does: the DSN and ARF fixtures
//! (tests/fixtures/feedback/, made by a real Postfix) and one SMTP conversation. Shared by the
//! feedback and brake tests (`#[path = "common/inbound.rs"] mod inbound;`).

#![allow(dead_code)]

use std::time::Duration;

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

use crate::common::repo_root;

const LONG: Duration = Duration::from_secs(60);

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("tests/fixtures/feedback").join(name)).unwrap()
}

/// One SMTP conversation with the listener: each command's reply (multi-line replies joined).
pub async fn converse(port: u16, steps: &[Step<'_>]) -> Vec<String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut replies = vec![reply(&mut read).await];
    for step in steps {
        match step {
            Step::Command(command) => write.write_all(format!("{command}\r\n").as_bytes()).await.unwrap(),
            Step::Data(data) => write.write_all(&dot_stuffed(data)).await.unwrap(),
        }
        replies.push(reply(&mut read).await);
    }
    replies
}

pub enum Step<'a> {
    Command(String),
    Data(&'a [u8]),
}

/// `data` as sent after DATA: lines starting with a dot doubled, ended by CRLF and the final dot.
pub fn dot_stuffed(data: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::with_capacity(data.len() + 64);
    for line in data.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    if !stuffed.ends_with(b"\r\n") {
        stuffed.extend_from_slice(b"\r\n");
    }
    stuffed.extend_from_slice(b".\r\n");
    stuffed
}

/// One SMTP reply, its lines joined.
pub async fn reply(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> String {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(LONG, read.read_line(&mut line)).await.expect("a reply in time").unwrap();
        assert!(n > 0, "the listener closed the connection; so far: {text}");
        text.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return text.trim_end().to_owned();
        }
    }
}

/// Delivers `message` to `rcpt` as an MTA delivers a DSN (null sender); returns the reply to
/// RCPT and the reply to the data (or the RCPT reply twice when it was refused).
pub async fn deliver(port: u16, rcpt: &str, message: &[u8]) -> (String, String) {
    let head = vec![
        Step::Command("EHLO mta.example".into()),
        Step::Command("MAIL FROM:<>".into()),
        Step::Command(format!("RCPT TO:<{rcpt}>")),
    ];
    let replies = converse(port, &head).await;
    let rcpt_reply = replies[3].clone();
    if !rcpt_reply.starts_with('2') {
        return (rcpt_reply.clone(), rcpt_reply);
    }
    let mut steps = head;
    steps.push(Step::Command("DATA".into()));
    steps.push(Step::Data(message));
    steps.push(Step::Command("QUIT".into()));
    let replies = converse(port, &steps).await;
    assert!(replies[4].starts_with("354"), "{replies:?}");
    (rcpt_reply, replies[5].clone())
}

/// Postfix's hard bounce (5.1.1, tests/fixtures/feedback/dsn-postfix-hard.eml) rewritten for
/// another dead address.
pub fn hard_bounce_for(address: &str) -> Vec<u8> {
    String::from_utf8(fixture("dsn-postfix-hard.eml")).unwrap().replace("nobody@hard.example", address).into_bytes()
}
