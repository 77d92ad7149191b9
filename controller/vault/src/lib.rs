//! Sealing what leaves the controller's state directory: an operator's
//! bundle (`mlopsctl operator add`) and a state export (`mlopsctl state
//! export`). The format is [age](https://age-encryption.org/v1), ASCII-armored
//! so that a bundle fits in an environment variable (CI), and readable by the
//! `age` tool too (`age -d`). A bundle is sealed either with a passphrase
//! (scrypt) or to age recipients (`age1...`, X25519), never both.
//!
//! Kept in its own crate: the age crate and its dependencies compile once,
//! apart from the crates that change often.

use std::io::{Read, Write};

use age::secrecy::SecretString;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("`{0}` is not an age recipient (expected `age1...`)")]
    BadRecipient(String),
    #[error("the identity file holds no age identity ({0})")]
    BadIdentity(String),
    #[error("an empty passphrase cannot seal anything")]
    EmptyPassphrase,
    #[error("cannot seal: {0}")]
    Seal(String),
    /// Not age, cut, or tampered with.
    #[error("not a sealed bundle, or a damaged one: {0}")]
    Damaged(String),
    /// Well formed, but the passphrase or identity is not the one it was sealed with.
    #[error("the passphrase or identity does not open it")]
    WrongKey,
}

/// What a bundle is sealed to.
pub enum SealTo {
    Passphrase(String),
    /// `age1...` public keys.
    Recipients(Vec<String>),
}

/// What opens a bundle.
pub enum OpenWith {
    Passphrase(String),
    /// The text of an age identity file (`AGE-SECRET-KEY-1...` lines).
    Identities(String),
}

/// Seals `plaintext`; the result is ASCII-armored text.
pub fn seal(plaintext: &[u8], to: &SealTo) -> Result<String, VaultError> {
    let encryptor = match to {
        SealTo::Passphrase(p) if p.is_empty() => return Err(VaultError::EmptyPassphrase),
        SealTo::Passphrase(p) => age::Encryptor::with_user_passphrase(SecretString::from(p.clone())),
        SealTo::Recipients(keys) => {
            let recipients: Vec<age::x25519::Recipient> = keys
                .iter()
                .map(|k| k.trim().parse().map_err(|_| VaultError::BadRecipient(k.clone())))
                .collect::<Result<_, _>>()?;
            if recipients.is_empty() {
                return Err(VaultError::BadRecipient(String::new()));
            }
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| VaultError::Seal(e.to_string()))?
        }
    };
    let seal_err = |e: std::io::Error| VaultError::Seal(e.to_string());
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor).map_err(seal_err)?;
    let mut writer = encryptor.wrap_output(armor).map_err(seal_err)?;
    writer.write_all(plaintext).map_err(seal_err)?;
    writer.finish().and_then(age::armor::ArmoredWriter::finish).map_err(seal_err)?;
    String::from_utf8(out).map_err(|e| VaultError::Seal(e.to_string()))
}

/// Opens what [`seal`] made (armored or binary).
pub fn open(sealed: &[u8], with: &OpenWith) -> Result<Vec<u8>, VaultError> {
    let reader = age::armor::ArmoredReader::new(sealed);
    let decryptor = age::Decryptor::new(reader).map_err(|e| VaultError::Damaged(e.to_string()))?;
    let result = match with {
        OpenWith::Passphrase(p) => {
            let mut identity = age::scrypt::Identity::new(SecretString::from(p.clone()));
            // Refuse work factors far above what `seal` picks (about a
            // second on this kind of machine): a bundle must not be able to
            // make its reader spin for minutes.
            identity.set_max_work_factor(22);
            decryptor.decrypt(std::iter::once(&identity as &dyn age::Identity))
        }
        OpenWith::Identities(text) => {
            let file =
                age::IdentityFile::from_buffer(text.as_bytes()).map_err(|e| VaultError::BadIdentity(e.to_string()))?;
            let identities = file.into_identities().map_err(|e| VaultError::BadIdentity(e.to_string()))?;
            if identities.is_empty() {
                return Err(VaultError::BadIdentity("no `AGE-SECRET-KEY-1` line".into()));
            }
            decryptor.decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        }
    };
    let mut reader = result.map_err(|e| match e {
        age::DecryptError::NoMatchingKeys | age::DecryptError::DecryptionFailed => VaultError::WrongKey,
        other => VaultError::Damaged(other.to_string()),
    })?;
    let mut plaintext = Vec::new();
    reader.read_to_end(&mut plaintext).map_err(|e| VaultError::Damaged(e.to_string()))?;
    Ok(plaintext)
}

/// A new age identity: the identity file's text (secret) and its recipient.
pub fn generate_identity() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    (format!("{}\n", id.to_string().expose_secret()), id.to_public().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrase_round_trip_and_refusals() {
        let sealed = seal(b"the bundle", &SealTo::Passphrase("correct horse".into())).unwrap();
        assert!(sealed.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"), "{sealed}");
        assert!(!sealed.contains("the bundle"));
        assert_eq!(open(sealed.as_bytes(), &OpenWith::Passphrase("correct horse".into())).unwrap(), b"the bundle");
        assert!(matches!(open(sealed.as_bytes(), &OpenWith::Passphrase("wrong".into())), Err(VaultError::WrongKey)));
        let (identity, _) = generate_identity();
        assert!(open(sealed.as_bytes(), &OpenWith::Identities(identity)).is_err());
        assert!(matches!(seal(b"x", &SealTo::Passphrase(String::new())), Err(VaultError::EmptyPassphrase)));
        let cut = &sealed.as_bytes()[..sealed.len() / 2];
        assert!(open(cut, &OpenWith::Passphrase("correct horse".into())).is_err());
        assert!(matches!(open(b"plain text", &OpenWith::Passphrase("x".into())), Err(VaultError::Damaged(_))));
    }

    #[test]
    fn recipients_round_trip() {
        let (alice, alice_pub) = generate_identity();
        let (bob, bob_pub) = generate_identity();
        let (eve, _) = generate_identity();
        let sealed = seal(b"state", &SealTo::Recipients(vec![alice_pub, bob_pub])).unwrap();
        assert_eq!(open(sealed.as_bytes(), &OpenWith::Identities(alice)).unwrap(), b"state");
        assert_eq!(open(sealed.as_bytes(), &OpenWith::Identities(bob)).unwrap(), b"state");
        assert!(matches!(open(sealed.as_bytes(), &OpenWith::Identities(eve)), Err(VaultError::WrongKey)));
        assert!(matches!(seal(b"x", &SealTo::Recipients(vec!["age1nope".into()])), Err(VaultError::BadRecipient(_))));
    }
}
