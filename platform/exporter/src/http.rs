//! HTTP over `std::net`: requests with a deadline, and a small server.
//! Messages are parsed by `httparse` (the parser under hyper); this module
//! only moves bytes. It stays on blocking `std` sockets rather than a client
//! crate because the exporter is a static binary in a `FROM scratch` image:
//! no async runtime, no TLS (Airflow is reached over the stack's network),
//! and names resolved by [`crate::dns`] (glibc's resolver needs NSS modules
//! that a scratch image does not have).
//!
//! Requests are HTTP/1.0, so the server closes the connection after its
//! answer; chunked answers are decoded all the same.

use std::io::{Read, Write};
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

/// A whole answer (read until the server closed the connection).
pub fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the answer ended inside its HTTP header".into()),
        Err(e) => {
            let first = String::from_utf8_lossy(raw.split(|b| *b == b'\n').next().unwrap_or_default());
            return Err(format!("not an HTTP answer ({e}): `{}`", first.trim()));
        }
    };
    let status = response.code.ok_or("the answer has no status code")?;
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let body = &raw[head_len..];
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(body)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| format!("bad Content-Length `{len}`"))?;
        body.get(..len).ok_or_else(|| format!("the answer ended after {} of {len} bytes", body.len()))?.to_vec()
    } else {
        body.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let (start, size) = match httparse::parse_chunk_size(data) {
            Ok(httparse::Status::Complete(x)) => x,
            Ok(httparse::Status::Partial) => return Err("truncated chunked body".into()),
            Err(_) => return Err("bad chunk size in a chunked body".into()),
        };
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        data = &data[start..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size..).and_then(|d| d.strip_prefix(b"\r\n")).ok_or("truncated chunk")?;
    }
}

/// The method and path of a request, once its header is complete (`None`
/// while more bytes are needed).
fn parse_request(buf: &[u8]) -> Result<Option<(String, String)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => Ok(Some((
            request.method.unwrap_or_default().to_string(),
            request.path.unwrap_or("/").split('?').next().unwrap_or("/").to_string(),
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Largest request header the server reads.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Serves `handler` (path → status, content type, body) on `listener`, a
/// thread per connection; runs until the process ends.
pub fn serve(listener: &TcpListener, handler: impl Fn(&str) -> (u16, &'static str, Vec<u8>) + Send + Sync + 'static) {
    let handler = std::sync::Arc::new(handler);
    for conn in listener.incoming() {
        let Ok(mut stream) = conn else { continue };
        let handler = handler.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 2048];
            let request = loop {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                match parse_request(&buf) {
                    Ok(Some(r)) => break Ok(r),
                    Ok(None) if buf.len() < MAX_REQUEST_HEAD => {}
                    Ok(None) => break Err("request header too large".to_string()),
                    Err(e) => break Err(e),
                }
            };
            let (status, ctype, body) = match request {
                Ok((method, path)) if method == "GET" => handler(&path),
                Ok(_) => (405, "text/plain", b"method not allowed\n".to_vec()),
                Err(e) => (400, "text/plain", format!("bad request: {e}\n").into_bytes()),
            };
            let reason = match status {
                200 => "OK",
                400 => "Bad Request",
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
        let sized = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabEXTRA").unwrap();
        assert_eq!(sized.body, b"ab", "Content-Length bounds the body");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err(), "short body");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nX: y").is_err(), "no header end");
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert_eq!(split_base("http://airflow-apiserver:8080").unwrap(), ("airflow-apiserver".into(), 8080));
        assert!(split_base("https://x").is_err());
    }

    #[test]
    fn requests_are_parsed_whole() {
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap(),
            Some(("GET".into(), "/metrics".into()))
        );
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost:").unwrap(), None, "more bytes needed");
        assert!(parse_request(b"\x16\x03\x01 tls hello\r\n\r\n").is_err());
    }

    #[test]
    fn the_server_answers_and_refuses() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || serve(&l, |path| (200, "text/plain", path.as_bytes().to_vec())));
        let r = request(&base, "GET", "/health", &[], None, Duration::from_secs(5)).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"/health"[..]));
        let r = request(&base, "POST", "/health", &[], Some(b"{}"), Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 405);
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
