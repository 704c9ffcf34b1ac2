//! Single-core throughput of the primitives a TLS ring link spends its CPU on: AES-128-GCM
//! seal and open of 16 KiB records through `ring` (the AEAD rustls uses here), a 1 MiB
//! memcpy, and the f32 add the reduce-scatter does. The README's speed arithmetic uses these.
//!
//!     cargo run -p ringtune-collectives --example aead_bench   (the crate builds at opt-level 3)

use std::time::Instant;

use ring::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};

const RECORD: usize = 16 << 10;
const TOTAL: usize = 2 << 30;

fn aead(name: &str, alg: &'static ring::aead::Algorithm) {
    let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
    let mut buf = vec![1u8; RECORD];
    let mut best_seal = f64::MAX;
    let mut best_open = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let mut tags = Vec::with_capacity(TOTAL / RECORD);
        for i in 0..TOTAL / RECORD {
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&(i as u64).to_be_bytes());
            let tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buf)
                .unwrap();
            tags.push(tag);
        }
        best_seal = best_seal.min(t.elapsed().as_secs_f64());
        // Open one sealed record repeatedly (the open cost does not depend on the contents).
        let mut rec = vec![3u8; RECORD];
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut rec,
            )
            .unwrap();
        rec.extend_from_slice(tag.as_ref());
        let mut work = rec.clone();
        let t = Instant::now();
        for _ in 0..TOTAL / RECORD {
            work.copy_from_slice(&rec);
            key.open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut work,
            )
            .unwrap();
        }
        best_open = best_open.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{name:18} seal {:.2} GB/s  open(+16 KiB copy) {:.2} GB/s  (16 KiB records, one core)",
        TOTAL as f64 / best_seal / 1e9,
        TOTAL as f64 / best_open / 1e9
    );
}

fn main() {
    aead("AES-128-GCM", &AES_128_GCM);
    aead("AES-256-GCM", &AES_256_GCM);
    aead("ChaCha20-Poly1305", &CHACHA20_POLY1305);
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
