//! Just enough DNS: one A query to the first `nameserver` of
//! `/etc/resolv.conf` (Docker's embedded server in a container).
//!
//! Why by hand: the exporter is a static glibc binary in a `FROM scratch`
//! image, where glibc's `getaddrinfo` fails (it loads NSS modules that the
//! image does not have). `hickory-resolver` needs a tokio runtime, and
//! `hickory-proto`'s codec brings the dependencies of its `std` feature
//! (futures, url, rand, ipnet, ...): more than the rest of the exporter, for
//! a 30-byte query and the first A record of the answer. The parser reads
//! through bounds-checked slices only, and is tested on truncated and
//! arbitrary input.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// Resolves `host` (a name or an address literal) to an address with `port`.
pub fn resolve(host: &str, port: u16, timeout: Duration) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    if host == "localhost" {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let server = resolv
        .lines()
        .find_map(|l| l.strip_prefix("nameserver").map(str::trim))
        .and_then(|s| s.parse::<IpAddr>().ok())
        .ok_or_else(|| "no nameserver in /etc/resolv.conf".to_string())?;
    // Docker's resolver answers short names; also try the search domains.
    let search: Vec<&str> = resolv
        .lines()
        .find_map(|l| l.strip_prefix("search"))
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default();
    let mut names = vec![host.to_string()];
    names.extend(search.iter().map(|d| format!("{host}.{d}")));
    let mut last = String::new();
    for name in names {
        match query_a(server, &name, timeout) {
            Ok(ip) => return Ok(SocketAddr::new(IpAddr::V4(ip), port)),
            Err(e) => last = e,
        }
    }
    Err(format!("cannot resolve {host}: {last}"))
}

fn query_a(server: IpAddr, name: &str, timeout: Duration) -> Result<Ipv4Addr, String> {
    let sock = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let packet = encode_query(id, name)?;
    sock.send_to(&packet, SocketAddr::new(server, 53)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).map_err(|e| format!("no DNS answer: {e}"))?;
    parse_answer(&buf[..n], id)
}

pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut p = Vec::with_capacity(32 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{name}` is not a host name"));
        }
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    Ok(p)
}

/// The first A record of a response to query `id`.
pub fn parse_answer(msg: &[u8], id: u16) -> Result<Ipv4Addr, String> {
    let bad = || "malformed DNS answer".to_string();
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id {
        return Err(bad());
    }
    let rcode = msg[3] & 0x0f;
    if rcode != 0 {
        return Err(format!("DNS error code {rcode}"));
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]) as usize;
    let an = u16::from_be_bytes([msg[6], msg[7]]) as usize;
    let mut i = 12;
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let len = *msg.get(i)? as usize;
            if len == 0 {
                return Some(i + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Some(i + 2);
            }
            i += 1 + len;
        }
    };
    for _ in 0..qd {
        i = skip_name(i).ok_or_else(bad)? + 4;
    }
    for _ in 0..an {
        i = skip_name(i).ok_or_else(bad)?;
        let rtype = u16::from_be_bytes([*msg.get(i).ok_or_else(bad)?, *msg.get(i + 1).ok_or_else(bad)?]);
        let rdlen = u16::from_be_bytes([*msg.get(i + 8).ok_or_else(bad)?, *msg.get(i + 9).ok_or_else(bad)?]) as usize;
        let data = msg.get(i + 10..i + 10 + rdlen).ok_or_else(bad)?;
        if rtype == 1 && rdlen == 4 {
            return Ok(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + rdlen;
    }
    Err("no A record".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_answer() {
        let q = encode_query(7, "airflow-apiserver").unwrap();
        assert_eq!(&q[12..13], &[17]);
        // A response: the question echoed, one answer with a compressed name.
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 1;
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 172, 18, 0, 5]);
        assert_eq!(parse_answer(&r, 7).unwrap(), Ipv4Addr::new(172, 18, 0, 5));
        assert!(parse_answer(&r, 8).is_err(), "another id");
        assert!(parse_answer(&r[..20], 7).is_err(), "truncated");
        let mut nx = q;
        nx[3] = 0x83;
        assert_eq!(parse_answer(&nx, 7).unwrap_err(), "DNS error code 3");
    }

    #[test]
    fn arbitrary_answers_never_panic() {
        // A deterministic spread of lengths and contents, including pointers
        // and label lengths that run past the end.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..400 {
            let msg: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            let id = msg.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            let _ = parse_answer(&msg, id);
        }
    }

    #[test]
    fn literals_need_no_lookup() {
        assert_eq!(resolve("10.1.2.3", 80, Duration::from_millis(10)).unwrap().to_string(), "10.1.2.3:80");
    }
}
