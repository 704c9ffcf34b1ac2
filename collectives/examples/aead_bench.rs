//! Single-core throughput of the primitives a TLS ring link spends its CPU on: AES-128-GCM
//! seal and open through `ring` (what rustls and quinn use here) and through `aws-lc-rs`
//! (the TCP+TLS frame cipher), on 16 KiB records (TLS's size) and on 256 KiB frames (the
//! TCP transports' size); the frame seal as the inline TCP driver does it, reading the
//! payload straight from a 64 MiB buffer; a memcpy; and the f32 add the reduce-scatter
//! does. The README's speed arithmetic uses these.
//!
//!     cargo run --release -p ringtune-collectives --example aead_bench

use std::time::Instant;

const RECORD: usize = 16 << 10;
const FRAME: usize = 256 << 10;
const TOTAL: usize = 2 << 30;

/// Best of three: GB/s of sealing `TOTAL` bytes in `$rec`-byte messages, and of opening
/// them (each open after a copy of the sealed message, as a receive would bring it).
macro_rules! aead_speed {
    ($m:ident, $alg:ident, $rec:expr) => {{
        use $m::aead::{$alg, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&$alg, &vec![7u8; $alg.key_len()]).unwrap());
        let rec: usize = $rec;
        let mut buf = vec![1u8; rec];
        let (mut best_seal, mut best_open) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t = Instant::now();
            for i in 0..TOTAL / rec {
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&(i as u64).to_be_bytes());
                let nonce = Nonce::assume_unique_for_key(n);
                let tag = key
                    .seal_in_place_separate_tag(nonce, Aad::empty(), &mut buf)
                    .unwrap();
                let _ = std::hint::black_box(tag);
            }
            best_seal = best_seal.min(t.elapsed().as_secs_f64());
            let mut sealed = vec![3u8; rec];
            let nonce = Nonce::assume_unique_for_key([0; 12]);
            let tag = key
                .seal_in_place_separate_tag(nonce, Aad::empty(), &mut sealed)
                .unwrap();
            sealed.extend_from_slice(tag.as_ref());
            let mut work = sealed.clone();
            let t = Instant::now();
            for _ in 0..TOTAL / rec {
                work.copy_from_slice(&sealed);
                let nonce = Nonce::assume_unique_for_key([0; 12]);
                key.open_in_place(nonce, Aad::empty(), &mut work).unwrap();
            }
            best_open = best_open.min(t.elapsed().as_secs_f64());
        }
        (
            TOTAL as f64 / best_seal / 1e9,
            TOTAL as f64 / best_open / 1e9,
        )
    }};
}

fn line(name: &str, (seal, open): (f64, f64), what: &str) {
    println!("{name:30} seal {seal:5.2} GB/s  open(+copy) {open:5.2} GB/s  ({what})");
}

/// The inline TCP driver's seal: header in place, payload read from a buffer far larger
/// than the caches, ciphertext and tag into the frame (`seal_in_place_scatter`).
fn frame_seal_from_buffer() -> f64 {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).unwrap());
    let src = vec![1u8; 64 << 20];
    let mut frame = vec![0u8; 24 + FRAME + 16];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for (i, p) in src.chunks(FRAME).enumerate() {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&(i as u64).to_be_bytes());
            let (prefix, rest) = frame.split_at_mut(4);
            let (header, out) = rest.split_at_mut(20);
            let nonce = Nonce::assume_unique_for_key(n);
            key.seal_in_place_scatter(nonce, Aad::from(&prefix[..]), header, p, out)
                .unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    src.len() as f64 / best / 1e9
}

fn main() {
    let ring_aes = "ring AES-128-GCM";
    line(
        ring_aes,
        aead_speed!(ring, AES_128_GCM, RECORD),
        "16 KiB records",
    );
    line(
        ring_aes,
        aead_speed!(ring, AES_128_GCM, FRAME),
        "256 KiB frames",
    );
    let aws = aead_speed!(aws_lc_rs, AES_128_GCM, FRAME);
    line("aws-lc-rs AES-128-GCM", aws, "256 KiB frames, in cache");
    println!(
        "{:30} seal {:5.2} GB/s  (256 KiB frames read from a 64 MiB buffer)",
        "aws-lc-rs AES-128-GCM scatter",
        frame_seal_from_buffer()
    );
    let (name, rec) = ("16 KiB records", RECORD);
    line(
        "ring AES-256-GCM",
        aead_speed!(ring, AES_256_GCM, rec),
        name,
    );
    line(
        "ring ChaCha20-Poly1305",
        aead_speed!(ring, CHACHA20_POLY1305, rec),
        name,
    );
    let src = vec![1u8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..TOTAL >> 20 {
            std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("memcpy 1 MiB       {:.2} GB/s", TOTAL as f64 / best / 1e9);
    // Out-of-cache copy: 64 MiB buffers.
    let src = vec![1u8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "memcpy 64 MiB      {:.2} GB/s",
        (64 << 20) as f64 / best / 1e9
    );
    let a = vec![1.0f32; 1 << 18];
    let mut d = vec![0.0f32; 1 << 18];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..TOTAL >> 20 {
            for (x, y) in d.iter_mut().zip(std::hint::black_box(&a)) {
                *x += *y;
            }
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "f32 add 1 MiB      {:.2} GB/s (bytes received)",
        TOTAL as f64 / best / 1e9
    );
}
