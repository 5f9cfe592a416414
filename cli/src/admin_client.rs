//! `fluxd queue ...`: a small blocking HTTP client of a running fluxd's admin endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::QueueCommand;

/// Run one queue command against the admin endpoint at `addr`; prints the JSON answer.
pub fn run(addr: &str, action: &QueueCommand) -> anyhow::Result<()> {
    let (method, path, body) = match action {
        QueueCommand::List => ("GET", "/queues".to_owned(), String::new()),
        QueueCommand::Stats { name } => ("GET", format!("/queues/{}", escape(name)), String::new()),
        QueueCommand::Create { name, bind, settings } => {
            let mut v: serde_json::Value = match settings {
                Some(s) => serde_json::from_str(s).context("--settings is not JSON")?,
                None => serde_json::json!({}),
            };
            if !bind.is_empty() {
                v["bind"] = serde_json::json!(bind);
            }
            ("PUT", format!("/queues/{}", escape(name)), v.to_string())
        }
        QueueCommand::Delete { name } => ("DELETE", format!("/queues/{}", escape(name)), String::new()),
        QueueCommand::Purge { name } => ("POST", format!("/queues/{}/purge", escape(name)), String::new()),
        QueueCommand::Seek { name, group, offset, time_ms, since_secs } => {
            if offset.is_none() && time_ms.is_none() && since_secs.is_none() {
                bail!("seek needs --offset, --time-ms or --since-secs");
            }
            let body = serde_json::json!({ "group": group, "offset": offset, "time_ms": time_ms, "since_secs": since_secs });
            ("POST", format!("/queues/{}/seek", escape(name)), body.to_string())
        }
        QueueCommand::Redrive { name, to, max } => {
            ("POST", format!("/queues/{}/redrive", escape(name)), serde_json::json!({ "to": to, "max": max }).to_string())
        }
        QueueCommand::Unbind { name, bind } => {
            ("POST", format!("/queues/{}/unbind", escape(name)), serde_json::json!({ "bind": bind }).to_string())
        }
    };
    let (status, answer) = request(addr, method, &path, &body)?;
    let pretty = serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(answer);
    println!("{pretty}");
    if !(200..300).contains(&status) {
        bail!("admin endpoint answered {status}");
    }
    Ok(())
}

/// Percent-escape what a path segment cannot hold as is.
fn escape(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn request(addr: &str, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("cannot reach the admin endpoint at {addr} (is fluxd running?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).context("reading the admin endpoint's answer")?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .context("malformed HTTP answer")?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}
