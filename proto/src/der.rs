//! The few X.509 facts both sides read from DER without an X.509 parser:
//! a certificate's subject and issuer common names and its end of
//! validity, and a revocation list's issuer, number and signature (checked
//! with the verification algorithms of rustls' provider).
//!
//! Everything read here comes from a peer or a file: every length is
//! checked, nothing panics, and anything unexpected is `None`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};

/// One DER element at the start of `b`: its tag, contents, the whole
/// element, and the rest.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8], &[u8])> {
    let (&tag, after_tag) = b.split_first()?;
    let (&first, mut rest) = after_tag.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    let header = b.len() - rest.len();
    Some((tag, &rest[..len], &b[..header + len], &rest[len..]))
}

/// The common name in a DER `Name` (its contents).
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (_, set, _, rest) = tlv(name)?;
        name = rest;
        let (_, attr, _, _) = tlv(set)?;
        let (_, oid, _, value) = tlv(attr)?;
        if oid == CN {
            let (_, text, _, _) = tlv(value)?;
            return String::from_utf8(text.to_vec()).ok();
        }
    }
    None
}

/// The parts of a certificate's `tbsCertificate` this module reads.
struct Tbs<'a> {
    issuer: &'a [u8],
    not_after: &'a [u8],
    not_after_tag: u8,
    subject: &'a [u8],
    /// `SubjectPublicKeyInfo` contents: algorithm, then the key.
    spki: &'a [u8],
}

fn tbs(cert: &[u8]) -> Option<Tbs<'_>> {
    let (_, cert, _, _) = tlv(cert)?;
    let (_, mut tbs, _, _) = tlv(cert)?;
    let (tag, _, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // [0] version
    }
    let (_, _, _, tbs) = tlv(tbs)?; // serial
    let (_, _, _, tbs) = tlv(tbs)?; // signature algorithm
    let (_, issuer, _, tbs) = tlv(tbs)?;
    let (_, validity, _, tbs) = tlv(tbs)?;
    let (_, subject, _, tbs) = tlv(tbs)?;
    let (_, spki, _, _) = tlv(tbs)?;
    let (_, _, _, after_not_before) = tlv(validity)?;
    let (not_after_tag, not_after, _, _) = tlv(after_not_before)?;
    Some(Tbs { issuer, not_after, not_after_tag, subject, spki })
}

/// A certificate's subject common name.
pub fn subject_common_name(cert: &[u8]) -> Option<String> {
    common_name(tbs(cert)?.subject)
}

/// A certificate's issuer common name.
pub fn issuer_common_name(cert: &[u8]) -> Option<String> {
    common_name(tbs(cert)?.issuer)
}

/// A certificate's end of validity, in seconds since the Unix epoch.
pub fn not_after_unix(cert: &[u8]) -> Option<i64> {
    let t = tbs(cert)?;
    let text = std::str::from_utf8(t.not_after).ok()?;
    let digits = text.strip_suffix('Z')?;
    let (year, rest) = match t.not_after_tag {
        0x17 if digits.len() == 12 => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        0x18 if digits.len() == 14 => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, hour, minute, second) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    // Days from civil (Howard Hinnant).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// A revocation list whose signature one of `ca_pem`'s certificates made:
/// its number (the `cRLNumber` extension; 0 without one).
pub fn verified_crl_number(crl_pem: &str, ca_pem: &str) -> Result<u64, String> {
    let crl = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
        .map_err(|_| "not a PEM revocation list".to_string())?;
    let bad = || "a malformed revocation list".to_string();
    let (_, list, _, _) = tlv(crl.as_ref()).ok_or_else(bad)?;
    let (_, tbs_list, tbs_whole, rest) = tlv(list).ok_or_else(bad)?;
    let (_, sig_alg, _, rest) = tlv(rest).ok_or_else(bad)?;
    let (_, sig_bits, _, _) = tlv(rest).ok_or_else(bad)?;
    let signature = sig_bits.strip_prefix(&[0]).ok_or_else(bad)?;
    // tbsCertList: version (INTEGER, v2), signature, issuer, thisUpdate, ...
    let (tag, _, _, mut fields) = tlv(tbs_list).ok_or_else(bad)?;
    if tag != 0x02 {
        fields = tbs_list;
    }
    let (_, _, _, fields) = tlv(fields).ok_or_else(bad)?;
    let (_, issuer, _, mut fields) = tlv(fields).ok_or_else(bad)?;
    let mut number = 0u64;
    while !fields.is_empty() {
        let (tag, contents, _, rest) = tlv(fields).ok_or_else(bad)?;
        fields = rest;
        if tag == 0xa0 {
            number = crl_number(contents).ok_or_else(bad)?;
        }
    }
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).filter_map(Result::ok) {
        let Some(t) = tbs(ca.as_ref()) else { continue };
        if t.subject != issuer {
            continue;
        }
        let Some((_, key_alg, _, rest)) = tlv(t.spki) else { continue };
        let Some((_, key_bits, _, _)) = tlv(rest) else { continue };
        let Some(key) = key_bits.strip_prefix(&[0]) else { continue };
        for alg in provider.signature_verification_algorithms.all {
            if alg.public_key_alg_id().as_ref() == key_alg
                && alg.signature_alg_id().as_ref() == sig_alg
                && alg.verify_signature(key, tbs_whole, signature).is_ok()
            {
                return Ok(number);
            }
        }
    }
    Err("the revocation list was not signed by a trusted CA".into())
}

/// The `cRLNumber` in a list's extensions (`[0]` contents).
fn crl_number(extensions: &[u8]) -> Option<u64> {
    const CRL_NUMBER: &[u8] = &[0x55, 0x1d, 0x14];
    let (_, mut list, _, _) = tlv(extensions)?;
    while !list.is_empty() {
        let (_, ext, _, rest) = tlv(list)?;
        list = rest;
        let (_, oid, _, mut after) = tlv(ext)?;
        if oid != CRL_NUMBER {
            continue;
        }
        let (tag, value, _, rest) = tlv(after)?;
        if tag == 0x01 {
            after = rest; // critical
            let (_, v, _, _) = tlv(after)?;
            return integer(v);
        }
        return integer(value);
    }
    Some(0)
}

/// An OCTET STRING's INTEGER, when it fits 64 bits.
fn integer(octets: &[u8]) -> Option<u64> {
    let (tag, digits, _, _) = tlv(octets)?;
    let digits = match digits {
        [0, rest @ ..] => rest,
        d => d,
    };
    (tag == 0x02 && digits.len() <= 8).then(|| digits.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
}
