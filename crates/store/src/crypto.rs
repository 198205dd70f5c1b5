//! Envelope encryption of chunk bytes: data keys ([`Dek`]), the AEAD helpers ([`seal`],
//! [`open`]) that the core also uses to wrap keys, and the encrypted chunk object format.
//!
//! ## Encrypted chunks
//! A chunk of an encrypted manifest is stored under `echunks/ab/cd/<id>` where
//! `id = BLAKE3-keyed(id_key(DEK), BLAKE3(plaintext))`: a keyed hash of the plaintext's
//! content id. The id depends on the data key, so identical plaintext under two DEKs gives
//! unrelated ids (nothing about the content leaks across images), while under one DEK it is
//! stored once (an image and all its O(1) copies share the DEK and the chunks). Hashing the
//! content id rather than the plaintext itself lets a plaintext chunk, whose content id is
//! its name, get its encrypted id without a pass over its bytes: an encrypting copy hashes
//! each source chunk once (to verify it), and a cross-region copy that encrypts on the way
//! knows every target id without reading a chunk.
//!
//! Encryption is AES-256-GCM under `enc_key(DEK)` (both keys derived from the DEK with BLAKE3
//! `derive_key`). The 96-bit nonce is the first 12 bytes of the id; since the id is a keyed
//! hash of the plaintext, a nonce repeats only for the same plaintext (deterministic,
//! SIV-style encryption), which makes re-encrypting a chunk idempotent (a resumed job writes
//! byte-identical objects). The associated data is `magic || nonce || id`, so a ciphertext
//! moved under another chunk's key (a swap) fails authentication.
//!
//! Object layout: `OIMSECK1` (8) | nonce (12) | BLAKE3(ciphertext||tag) (32) | ciphertext ||
//! tag (16). The keyless BLAKE3 lets fsck verify encrypted chunks without any key.

use crate::error::{Result, StoreError};
use crate::id::ChunkId;
use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

/// Magic of an encrypted chunk object.
pub const ECHUNK_MAGIC: &[u8; 8] = b"OIMSECK1";
/// Bytes before the ciphertext in an encrypted chunk object.
pub const ECHUNK_HEADER_LEN: usize = 8 + 12 + 32;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes an encrypted chunk object adds to its plaintext.
pub const ECHUNK_OVERHEAD: usize = ECHUNK_HEADER_LEN + TAG_LEN;
/// Nonce length of [`seal`]ed blobs.
pub const NONCE_LEN: usize = 12;

/// A 256-bit data key (or any AES-256 key). Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Dek([u8; 32]);

impl std::fmt::Debug for Dek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dek(..)")
    }
}

impl Drop for Dek {
    fn drop(&mut self) {
        // Best effort: overwrite the key bytes before the memory is released.
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference to a byte of `self.0`.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl Dek {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Dek {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Dek(k)
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(b: [u8; 32]) -> Dek {
        Dek(b)
    }

    /// A key from a slice; `Invalid` unless it is 32 bytes long.
    pub fn from_slice(b: &[u8]) -> Result<Dek> {
        let a: [u8; 32] = b
            .try_into()
            .map_err(|_| StoreError::Invalid(format!("a key is 32 bytes, got {}", b.len())))?;
        Ok(Dek(a))
    }

    /// The raw key bytes (for wrapping only).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn enc_key(&self) -> [u8; 32] {
        blake3::derive_key("openims 2026 encrypted chunk aes-256-gcm key", &self.0)
    }

    /// Key of the chunk id hash. Version 2 of the context: ids are keyed hashes of content
    /// ids; the first version hashed the plaintext, and its chunks (still readable: reading
    /// needs only the stored id) can never share an id with a second-version one.
    fn id_key(&self) -> [u8; 32] {
        blake3::derive_key("openims 2026 encrypted chunk id key v2", &self.0)
    }
}

/// An AES-256-GCM key (ring's implementation: AES-NI/VAES and carry-less multiply, several
/// times faster than a portable one, which matters on the streaming encryption path).
fn gcm_key(key: &[u8; 32]) -> Result<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| StoreError::Invalid("bad AES key length".into()))
}

fn gcm_nonce(nonce: &[u8]) -> Result<Nonce> {
    Nonce::try_assume_unique_for_key(nonce)
        .map_err(|_| StoreError::Invalid("bad AES-GCM nonce length".into()))
}

/// Encrypts `plaintext` with AES-256-GCM under `key` and a random nonce, binding `aad`.
/// Output: nonce (12) || ciphertext || tag (16).
pub fn seal(key: &Dek, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let cipher = gcm_key(key.as_bytes())?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let tag = cipher
        .seal_in_place_separate_tag(gcm_nonce(&nonce)?, Aad::from(aad), &mut out[NONCE_LEN..])
        .map_err(|_| StoreError::Invalid("encryption failed".into()))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens a blob made by [`seal`] with the same key and `aad`; `Corrupt` (key "sealed") when
/// the key, the associated data or the bytes do not match.
pub fn open(key: &Dek, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(StoreError::corrupt("sealed", "sealed blob too short"));
    }
    let cipher = gcm_key(key.as_bytes())?;
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let mut buf = ct.to_vec();
    let n = cipher
        .open_in_place(gcm_nonce(nonce)?, Aad::from(aad), &mut buf)
        .map_err(|_| {
            StoreError::corrupt(
                "sealed",
                "authentication failed (wrong key, wrong context or altered bytes)",
            )
        })?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// Key of an encrypted chunk: `echunks/ab/cd/<hex>`.
pub fn echunk_key(id: &ChunkId) -> String {
    let h = id.to_hex();
    format!("echunks/{}/{}/{}", &h[0..2], &h[2..4], h)
}

/// Prefix under which all encrypted chunks live.
pub const ECHUNK_PREFIX: &str = "echunks/";

/// The id `plaintext` gets under `dek` (one pass over it, for its content id).
pub fn encrypted_chunk_id(dek: &Dek, plaintext: &[u8]) -> ChunkId {
    encrypted_id_of(dek, &ChunkId::hash(plaintext))
}

/// The id under `dek` of the chunk whose plaintext has content id `plain` (no pass over the
/// data: a keyed hash of the 32-byte content id).
pub fn encrypted_id_of(dek: &Dek, plain: &ChunkId) -> ChunkId {
    ChunkId(*blake3::keyed_hash(&dek.id_key(), plain.as_bytes()).as_bytes())
}

fn echunk_aad(nonce: &[u8], id: &ChunkId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(8 + NONCE_LEN + 32);
    aad.extend_from_slice(ECHUNK_MAGIC);
    aad.extend_from_slice(nonce);
    aad.extend_from_slice(id.as_bytes());
    aad
}

/// Encrypts one chunk: returns its id under `dek` and the object bytes to store.
pub fn encrypt_chunk(dek: &Dek, plaintext: &[u8]) -> Result<(ChunkId, Vec<u8>)> {
    encrypt_chunk_of(dek, &ChunkId::hash(plaintext), plaintext)
}

/// Like [`encrypt_chunk`] for a plaintext whose content id `plain` the caller has (a stored
/// chunk, read and verified against its name): no pass over the bytes to hash them again.
pub fn encrypt_chunk_of(
    dek: &Dek,
    plain: &ChunkId,
    plaintext: &[u8],
) -> Result<(ChunkId, Vec<u8>)> {
    let id = encrypted_id_of(dek, plain);
    Ok((id, encrypt_chunk_as(dek, &id, plaintext)?))
}

/// The object bytes of a chunk whose id under `dek` the caller already computed with
/// [`encrypted_chunk_id`] (saves hashing the plaintext twice).
pub(crate) fn encrypt_chunk_as(dek: &Dek, id: &ChunkId, plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut out = vec![0u8; ECHUNK_OVERHEAD + plaintext.len()];
    encrypt_chunk_into(dek, id, plaintext, &mut out)?;
    Ok(out)
}

/// Writes the object bytes of chunk `id` (its id under `dek`, see [`encrypted_chunk_id`])
/// into `out`, which must be exactly [`ECHUNK_OVERHEAD`] bytes longer than `plaintext`:
/// the plaintext is copied once into place and encrypted there.
pub(crate) fn encrypt_chunk_into(
    dek: &Dek,
    id: &ChunkId,
    plaintext: &[u8],
    out: &mut [u8],
) -> Result<()> {
    if out.len() != plaintext.len() + ECHUNK_OVERHEAD {
        return Err(StoreError::Invalid(format!(
            "encrypted chunk buffer of {} bytes for {} bytes of plaintext",
            out.len(),
            plaintext.len()
        )));
    }
    let nonce = &id.as_bytes()[..NONCE_LEN];
    let cipher = gcm_key(&dek.enc_key())?;
    out[..8].copy_from_slice(ECHUNK_MAGIC);
    out[8..20].copy_from_slice(nonce);
    let (body, tag_out) = out[ECHUNK_HEADER_LEN..].split_at_mut(plaintext.len());
    body.copy_from_slice(plaintext);
    let tag = cipher
        .seal_in_place_separate_tag(gcm_nonce(nonce)?, Aad::from(echunk_aad(nonce, id)), body)
        .map_err(|_| StoreError::Invalid("encryption failed".into()))?;
    tag_out.copy_from_slice(tag.as_ref());
    let sum = blake3::hash(&out[ECHUNK_HEADER_LEN..]);
    out[20..52].copy_from_slice(sum.as_bytes());
    Ok(())
}

/// Checks the parts of an encrypted chunk object that need no key and no pass over the
/// data: length, magic and the nonce belonging to `id`.
fn check_header(id: &ChunkId, obj: &[u8]) -> Result<()> {
    if obj.len() < ECHUNK_OVERHEAD || &obj[..8] != ECHUNK_MAGIC {
        return Err(StoreError::corrupt(
            echunk_key(id),
            "not an encrypted chunk object",
        ));
    }
    if obj[8..20] != id.as_bytes()[..NONCE_LEN] {
        return Err(StoreError::corrupt(
            echunk_key(id),
            "nonce does not belong to this chunk",
        ));
    }
    Ok(())
}

/// Checks an encrypted chunk object without any key (magic, nonce matching `id`, ciphertext
/// checksum); returns the plaintext length.
pub fn check_encrypted_chunk(id: &ChunkId, obj: &[u8]) -> Result<u64> {
    check_header(id, obj)?;
    if blake3::hash(&obj[ECHUNK_HEADER_LEN..]).as_bytes() != &obj[20..52] {
        return Err(StoreError::corrupt(
            echunk_key(id),
            "ciphertext checksum mismatch",
        ));
    }
    Ok((obj.len() - ECHUNK_OVERHEAD) as u64)
}

/// Decrypts an encrypted chunk object stored as `id` (see [`decrypt_chunk_in_place`]).
pub fn decrypt_chunk(dek: &Dek, id: &ChunkId, obj: &[u8]) -> Result<Vec<u8>> {
    let mut buf = obj.to_vec();
    let plain = decrypt_chunk_in_place(dek, id, &mut buf)?;
    buf.truncate(plain.end);
    buf.drain(..plain.start);
    Ok(buf)
}

/// Decrypts an encrypted chunk object stored as `id` in place; returns the range of `obj`
/// that then holds the plaintext.
///
/// The checks: the header (magic, and the nonce belonging to `id`), then the AES-GCM tag,
/// which authenticates every ciphertext byte and binds nonce and id (associated data) under a
/// key only holders of the data key have. That makes the keyless ciphertext checksum (for
/// [`check_encrypted_chunk`] and fsck) and a re-hash of the plaintext into its id redundant
/// here: a wrong byte fails the tag, and whoever could forge a tag could compute a matching
/// id too. Skipping them saves two passes over every chunk read.
pub fn decrypt_chunk_in_place(
    dek: &Dek,
    id: &ChunkId,
    obj: &mut [u8],
) -> Result<std::ops::Range<usize>> {
    check_header(id, obj)?;
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&obj[8..20]);
    let cipher = gcm_key(&dek.enc_key())?;
    let end = obj.len() - TAG_LEN;
    let (body, tag) = obj[ECHUNK_HEADER_LEN..].split_at_mut(end - ECHUNK_HEADER_LEN);
    let tag: [u8; TAG_LEN] = (&*tag)
        .try_into()
        .map_err(|_| StoreError::corrupt(echunk_key(id), "short tag"))?;
    cipher
        .open_in_place_separate_tag(
            gcm_nonce(&nonce)?,
            Aad::from(echunk_aad(&nonce, id)),
            Tag::from(tag),
            body,
            0..,
        )
        .map_err(|_| {
            StoreError::corrupt(
                echunk_key(id),
                "authentication failed: wrong data key or a chunk not stored under this id",
            )
        })?;
    Ok(ECHUNK_HEADER_LEN..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_wrong_key_or_context_fails() {
        let kek = Dek::generate();
        let dek = Dek::generate();
        let wrapped = seal(&kek, b"ctx-a", dek.as_bytes()).expect("seal");
        assert_eq!(wrapped.len(), NONCE_LEN + 32 + TAG_LEN);
        let back = open(&kek, b"ctx-a", &wrapped).expect("open");
        assert_eq!(Dek::from_slice(&back).expect("32"), dek);
        // Wrong key.
        assert!(open(&Dek::generate(), b"ctx-a", &wrapped)
            .expect_err("wrong key")
            .is_corrupt());
        // Wrong associated data (another key id).
        assert!(open(&kek, b"ctx-b", &wrapped).is_err());
        // Any bit flip.
        for i in 0..wrapped.len() {
            let mut w = wrapped.clone();
            w[i] ^= 1;
            assert!(open(&kek, b"ctx-a", &w).is_err(), "flip at {i}");
        }
        assert!(open(&kek, b"ctx-a", &wrapped[..10]).is_err());
        // Two seals of the same key differ (random nonce).
        assert_ne!(wrapped, seal(&kek, b"ctx-a", dek.as_bytes()).expect("seal"));
        assert_eq!(format!("{dek:?}"), "Dek(..)");
    }

    #[test]
    fn chunk_round_trip_is_deterministic_per_key() {
        let dek = Dek::generate();
        let data = vec![7u8; 10_000];
        let (id, obj) = encrypt_chunk(&dek, &data).expect("enc");
        assert_eq!(obj.len(), data.len() + ECHUNK_OVERHEAD);
        assert_ne!(
            &obj[ECHUNK_HEADER_LEN..ECHUNK_HEADER_LEN + 100],
            &data[..100]
        );
        assert_eq!(decrypt_chunk(&dek, &id, &obj).expect("dec"), data);
        assert_eq!(check_encrypted_chunk(&id, &obj).expect("check"), 10_000);
        // Same key, same data: same id and bytes (idempotent re-encryption).
        assert_eq!(encrypt_chunk(&dek, &data).expect("enc"), (id, obj.clone()));
        // Another key: unrelated id, and the first key's object does not open with it.
        let other = Dek::generate();
        let (id2, _) = encrypt_chunk(&other, &data).expect("enc");
        assert_ne!(id, id2);
        assert!(decrypt_chunk(&other, &id, &obj).is_err());
        // The plaintext's content hash is not the id.
        assert_ne!(id, ChunkId::hash(&data));
    }

    #[test]
    fn an_encrypted_id_derives_from_the_content_id_under_the_data_key() {
        let (dek, other) = (Dek::generate(), Dek::generate());
        let data = vec![0x5au8; 4096];
        let plain = ChunkId::hash(&data);
        let id = encrypted_chunk_id(&dek, &data);
        // What a copy computes from the source's name alone equals the id of the bytes.
        assert_eq!(encrypted_id_of(&dek, &plain), id);
        // It depends on the key and hides the content id.
        assert_ne!(encrypted_id_of(&other, &plain), id);
        assert_ne!(id, plain);
        // Other content, other id.
        assert_ne!(encrypted_chunk_id(&dek, &[0x5bu8; 4096]), id);
        // Not the first derivation (a keyed hash of the bytes), so ids of the two never meet.
        let v1_key = blake3::derive_key("openims 2026 encrypted chunk id key", dek.as_bytes());
        assert_ne!(ChunkId(*blake3::keyed_hash(&v1_key, &data).as_bytes()), id);
        assert_ne!(
            ChunkId(*blake3::keyed_hash(&dek.id_key(), &data).as_bytes()),
            id
        );
    }

    #[test]
    fn objects_are_standard_aes_256_gcm() {
        // Another implementation (RustCrypto) opens what this one sealed, and the reverse:
        // the stored format is plain AES-256-GCM, whatever library computes it.
        use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
        let kek = Dek::generate();
        let sealed = seal(&kek, b"ctx", b"secret key bytes").expect("seal");
        let other = aes_gcm::Aes256Gcm::new_from_slice(kek.as_bytes()).expect("key");
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let plain = other
            .decrypt(
                aes_gcm::Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: b"ctx",
                },
            )
            .expect("RustCrypto opens it");
        assert_eq!(plain, b"secret key bytes");
        let resealed = other
            .encrypt(
                aes_gcm::Nonce::from_slice(nonce),
                Payload {
                    msg: b"x",
                    aad: b"c",
                },
            )
            .expect("seal");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&resealed);
        assert_eq!(open(&kek, b"c", &blob).expect("open"), b"x");

        let dek = Dek::generate();
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let (id, obj) = encrypt_chunk(&dek, &data).expect("enc");
        let chunk_key = aes_gcm::Aes256Gcm::new_from_slice(&dek.enc_key()).expect("key");
        let nonce = &obj[8..20];
        let body = &obj[ECHUNK_HEADER_LEN..];
        let (ct, tag) = body.split_at(body.len() - TAG_LEN);
        let mut plain = ct.to_vec();
        chunk_key
            .decrypt_in_place_detached(
                aes_gcm::Nonce::from_slice(nonce),
                &echunk_aad(nonce, &id),
                &mut plain,
                aes_gcm::Tag::from_slice(tag),
            )
            .expect("RustCrypto opens the chunk");
        assert_eq!(plain, data);
    }

    #[test]
    fn swapped_chunks_are_detected() {
        let dek = Dek::generate();
        let (a, obj_a) = encrypt_chunk(&dek, b"chunk A content").expect("a");
        let (b, obj_b) = encrypt_chunk(&dek, b"chunk B content").expect("b");
        // Object B stored under A's key (and vice versa): refused even by the keyless check
        // (nonce bound to the id) and, with the nonce patched, by the AEAD (id in the AAD).
        assert!(decrypt_chunk(&dek, &a, &obj_b).is_err());
        assert!(decrypt_chunk(&dek, &b, &obj_a).is_err());
        let mut forged = obj_b.clone();
        forged[8..20].copy_from_slice(&a.as_bytes()[..12]);
        let e = decrypt_chunk(&dek, &a, &forged).expect_err("aad binds id");
        assert!(e.is_corrupt());
        // A flipped ciphertext bit with a recomputed checksum: the tag catches it.
        let mut flipped = obj_a.clone();
        flipped[ECHUNK_HEADER_LEN] ^= 1;
        let sum = blake3::hash(&flipped[ECHUNK_HEADER_LEN..]);
        flipped[20..52].copy_from_slice(sum.as_bytes());
        assert!(check_encrypted_chunk(&a, &flipped).is_ok());
        assert!(decrypt_chunk(&dek, &a, &flipped).is_err());
        // Without the recomputed checksum the keyless check already fails.
        let mut raw = obj_a;
        raw[ECHUNK_HEADER_LEN + 3] ^= 4;
        assert!(check_encrypted_chunk(&a, &raw).is_err());
    }
}
