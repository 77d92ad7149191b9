//! HTTP/1.0 over `std::net`: requests with a deadline, and a tiny server.
//!
//! HTTP/1.0 keeps the client simple: the server closes the connection after
//! the response and sends no chunked encoding.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Largest response body read; Airflow lists are paginated well below it.
const MAX_BODY: u64 = 32 << 20;

/// `http://host[:port]` → (host, port).
pub fn split_base(base: &str) -> Result<(String, u16), String> {
    let rest = base.strip_prefix("http://").ok_or_else(|| format!("`{base}`: only http:// URLs are supported"))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    match hostport.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse().map_err(|_| format!("`{base}`: bad port"))?)),
        None => Ok((hostport.to_string(), 80)),
    }
}

/// One request; the whole exchange must finish within `timeout`.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, String> {
    let deadline = Instant::now() + timeout;
    let (host, port) = split_base(base)?;
    let addr = crate::dns::resolve(&host, port, timeout)?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_write_timeout(Some(left())).map_err(|e| e.to_string())?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: application/json\r\nUser-Agent: mlops-airflow-exporter\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).map_err(|e| format!("send: {e}"))?;
    if let Some(b) = body {
        stream.write_all(b).map_err(|e| format!("send: {e}"))?;
    }
    let mut raw = Vec::new();
    let mut reader = stream.take(MAX_BODY + 64 * 1024);
    let mut buf = [0u8; 16 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no complete answer within {} ms", timeout.as_millis()));
        }
        reader.get_mut().set_read_timeout(Some(left())).map_err(|e| e.to_string())?;
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(format!("no complete answer within {} ms", timeout.as_millis()));
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("the answer has no HTTP header end")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(format!("not an HTTP answer: `{status_line}`"));
    }
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let mut body = raw[split + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").ok_or("bad chunked body")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// Serves `handler` (path → status, content type, body) on `listener`, a
/// thread per connection; runs until the process ends.
pub fn serve(listener: &TcpListener, handler: impl Fn(&str) -> (u16, &'static str, Vec<u8>) + Send + Sync + 'static) {
    let handler = std::sync::Arc::new(handler);
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let handler = handler.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut line = String::new();
            let mut reader = BufReader::new(match stream.try_clone() {
                Ok(s) => s,
                Err(_) => return,
            });
            if reader.read_line(&mut line).is_err() {
                return;
            }
            // Drain the headers.
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = if line.starts_with("GET ") {
                handler(path)
            } else {
                (405, "text/plain", b"method not allowed\n".to_vec())
            };
            let reason = match status {
                200 => "OK",
                404 => "Not Found",
                405 => "Method Not Allowed",
                _ => "Error",
            };
            let head = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\r\n{\"a\":1}").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{\"a\":1}"[..]));
        let c =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                .unwrap();
        assert_eq!(c.body, b"abcde");
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert_eq!(split_base("http://airflow-apiserver:8080").unwrap(), ("airflow-apiserver".into(), 8080));
        assert!(split_base("https://x").is_err());
    }

    #[test]
    fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _hold = std::thread::spawn(move || {
            let (_s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_secs(2));
        });
        let start = Instant::now();
        let e = request(&format!("http://127.0.0.1:{port}"), "GET", "/", &[], None, Duration::from_millis(300))
            .unwrap_err();
        assert!(e.contains("within 300 ms"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
