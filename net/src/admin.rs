//! The admin endpoint: HTTP/1.1 + JSON on a local address, served by shard 0, for `fluxd queue
//! ...` and scripts.
//!
//! | request | answer |
//! |---|---|
//! | `GET /queues` | every queue: depth, bytes, consumers, per-group lag, counters |
//! | `GET /queues/<name>` | one queue (404 if none) |
//! | `PUT /queues/<name>` with a JSON body of `[[queue]]` keys | create it or change its settings |
//! | `DELETE /queues/<name>` | delete it and its messages |
//! | `POST /queues/<name>/purge` | drop its messages |
//! | `POST /queues/<name>/unbind` with `{"bind": [filters]}` | remove bindings |
//! | `POST /queues/<name>/seek` with `{"group": g, "offset": n}` (or `"time_ms"`, ms since the epoch, or `"since_secs"`) | the group starts over there |
//! | `POST /queues/<name>/redrive` with `{"to": queue, "max": n}` (both optional) | move messages (of a dead-letter queue) back to `to`, or each to the queue it came from |
//!
//! One request per connection (`Connection: close`), bounded in size and time; anything else is
//! answered 400/404/405 with a JSON `{"error": ...}`.

use std::rc::Rc;
use std::time::Duration;

use flux_core::queue::{QueueName, QueueSettings};
use flux_shard::broker::queues::QueueStatsView;
use flux_shard::broker::Broker;
use flux_shard::msg::QueueAdminOp;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use serde_json::{json, Value};

/// Largest request accepted (headers and body).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Time a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve admin requests until the task is dropped.
pub async fn serve(broker: Rc<Broker>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(handle(broker.clone(), stream)).detach();
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> Result<Request, (u16, String)> {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| (400, format!("read failed: {e}")))?;
        if n == 0 {
            return Err((400, "connection closed before a full request".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST_BYTES {
            return Err((413, format!("request larger than {MAX_REQUEST_BYTES} bytes")));
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let header_len = match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err((400, format!("bad request: {e}"))),
        };
        let content_length = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if header_len + content_length > MAX_REQUEST_BYTES {
            return Err((413, format!("request larger than {MAX_REQUEST_BYTES} bytes")));
        }
        if buf.len() < header_len + content_length {
            continue;
        }
        return Ok(Request {
            method: req.method.unwrap_or("").to_owned(),
            path: req.path.unwrap_or("").to_owned(),
            body: buf[header_len..header_len + content_length].to_vec(),
        });
    }
}

async fn handle(broker: Rc<Broker>, mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (status, body) = match read_request(&mut stream).await {
        Ok(req) => route(&broker, req).await,
        Err((status, msg)) => (status, json!({ "error": msg })),
    };
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.close().await;
}

fn stats_json(s: &QueueStatsView) -> Value {
    json!({
        "name": s.name,
        "depth": s.depth,
        "bytes": s.bytes,
        "consumers": s.consumers,
        "groups": s.groups.iter().map(|(g, consumers, lag, age)| json!({
            "group": g, "consumers": consumers, "lag_messages": lag, "oldest_age_ms": age,
        })).collect::<Vec<_>>(),
        "published": s.stats.published,
        "delivered": s.stats.delivered,
        "redelivered": s.stats.redelivered,
        "acked": s.stats.acked,
        "dead_lettered": s.stats.dead_lettered,
        "dropped_overflow": s.stats.dropped_overflow,
        "expired": s.stats.expired,
        "rejected_full": s.stats.rejected_full,
        "resident_bytes": s.resident_bytes,
        "runs": s.runs.0,
        "runs_on_disk": s.runs.1,
        "spilled_runs": s.stats.spilled_runs,
        "loaded_runs": s.stats.loaded_runs,
    })
}

/// `%XX` escapes in a path segment (queue names may hold `$`, and `$q/...` names `/`).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn route(broker: &Rc<Broker>, req: Request) -> (u16, Value) {
    let path = req.path.split('?').next().unwrap_or("");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["queues"]) => {
            let all = broker.admin_list().await;
            (200, Value::Array(all.iter().map(stats_json).collect()))
        }
        (method, ["queues", raw_name, rest @ ..]) => {
            let Some(name) = percent_decode(raw_name) else {
                return (400, json!({ "error": "bad escape in queue name" }));
            };
            let Ok(qname) = QueueName::parse_any(&name) else {
                return (400, json!({ "error": format!("invalid queue name {name:?}") }));
            };
            match (method, rest) {
                ("GET", []) => match broker.admin_list().await.iter().find(|s| s.name == name) {
                    Some(s) => (200, stats_json(s)),
                    None => (404, json!({ "error": format!("no queue {name}") })),
                },
                ("PUT", []) => {
                    let settings: QueueSettings = if req.body.iter().all(u8::is_ascii_whitespace) {
                        QueueSettings::default()
                    } else {
                        match serde_json::from_slice(&req.body) {
                            Ok(s) => s,
                            Err(e) => return (400, json!({ "error": format!("bad queue settings: {e}") })),
                        }
                    };
                    let settings = QueueSettings { name: name.clone(), ..settings };
                    let (_, config, filters) = match settings.spec() {
                        Ok(s) => s,
                        Err(e) => return (400, json!({ "error": e })),
                    };
                    match broker.admin_queue_op(&qname, QueueAdminOp::Declare { config, filters }).await {
                        Ok(_) => (200, json!({ "name": name, "declared": true })),
                        Err(e) => (500, json!({ "error": e })),
                    }
                }
                ("DELETE", []) => match broker.admin_queue_op(&qname, QueueAdminOp::Delete).await {
                    Ok(n) => (200, json!({ "name": name, "deleted": true, "messages": n })),
                    Err(e) => (404, json!({ "error": e })),
                },
                ("POST", ["unbind"]) => {
                    let filters: Vec<flux_core::topic::TopicFilter> = match serde_json::from_slice::<Value>(&req.body)
                        .ok()
                        .and_then(|v| v.get("bind").and_then(|b| b.as_array()).cloned())
                        .map(|a| a.iter().filter_map(|f| f.as_str().and_then(|s| flux_core::topic::TopicFilter::new(s).ok())).collect())
                    {
                        Some(f) => f,
                        None => return (400, json!({ "error": "expected {\"bind\": [\"filter\", ...]}" })),
                    };
                    match broker.admin_queue_op(&qname, QueueAdminOp::Unbind { filters }).await {
                        Ok(n) => (200, json!({ "name": name, "unbound": n })),
                        Err(e) => (404, json!({ "error": e })),
                    }
                }
                ("POST", ["seek"]) => {
                    let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                    let group = v.get("group").and_then(Value::as_str).unwrap_or(flux_core::queue::DEFAULT_GROUP).to_owned();
                    let offset = v.get("offset").and_then(Value::as_u64);
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let time_ms = v.get("time_ms").and_then(Value::as_u64).or_else(|| {
                        v.get("since_secs").and_then(Value::as_u64).map(|s| now_ms.saturating_sub(s.saturating_mul(1000)))
                    });
                    if offset.is_none() && time_ms.is_none() {
                        return (400, json!({ "error": "expected {\"group\": g, \"offset\": n | \"time_ms\": t | \"since_secs\": s}" }));
                    }
                    match broker.admin_queue_op(&qname, QueueAdminOp::Seek { group: group.clone(), offset, time_ms }).await {
                        Ok(at) => (200, json!({ "name": name, "group": group, "offset": at })),
                        Err(e) => (404, json!({ "error": e })),
                    }
                }
                ("POST", ["redrive"]) => {
                    let v: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                    let to = match v.get("to").and_then(Value::as_str).map(QueueName::parse_any) {
                        None => None,
                        Some(Ok(t)) => Some(t),
                        Some(Err(e)) => return (400, json!({ "error": format!("bad target queue: {e}") })),
                    };
                    let max = v.get("max").and_then(Value::as_u64).map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
                    match broker.admin_redrive(&qname, to, max).await {
                        Ok(n) => (200, json!({ "name": name, "moved": n })),
                        Err(e) => (500, json!({ "error": e })),
                    }
                }
                ("POST", ["purge"]) => match broker.admin_queue_op(&qname, QueueAdminOp::Purge).await {
                    Ok(n) => (200, json!({ "name": name, "purged": n })),
                    Err(e) => (404, json!({ "error": e })),
                },
                _ => (405, json!({ "error": format!("{method} {path} is not supported") })),
            }
        }
        _ => (404, json!({ "error": format!("no such endpoint: {} {path}", req.method) })),
    }
}
