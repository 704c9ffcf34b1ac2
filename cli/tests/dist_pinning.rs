//! Nodes pinning the coordinator's certificate, with real processes: by the fingerprint
//! the coordinator writes (`--fingerprint-file`) and by a CA that issued the certificate
//! it presents (`--tls-cert`/`--tls-key`). A node whose pin fails says so at once, naming
//! both certificates, instead of retrying until its connect timeout; the run goes on with
//! the nodes that pass.

mod dist_common;

use std::path::Path;
use std::time::{Duration, Instant};

use dist_common::*;

/// A CA and a certificate it issued for 127.0.0.1, as PEM files in `dir`: (ca, cert, key).
fn ca_and_leaf(dir: &Path, name: &str) -> (String, String, String) {
    ca_and_leaf_valid(dir, name, None)
}

/// [`ca_and_leaf`], the certificate valid from 1 January of the first year to 1 January
/// of the second when given.
fn ca_and_leaf_valid(
    dir: &Path,
    name: &str,
    years: Option<(i32, i32)>,
) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    if let Some((from, to)) = years {
        leaf.not_before = rcgen::date_time_ymd(from, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    let leaf = leaf.signed_by(&leaf_key, &ca).unwrap();
    let write = |file: String, text: String| {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    (
        write(format!("{name}-ca.pem"), ca.pem()),
        write(format!("{name}-cert.pem"), leaf.pem()),
        write(format!("{name}-key.pem"), leaf_key.serialize_pem()),
    )
}

/// A node that must fail its pin: exits non-zero well before its connect timeout (30 s).
fn refused(addr: &str, extra: &[&str]) -> String {
    let t0 = Instant::now();
    let mut args = vec!["--connect-timeout", "30"];
    args.extend_from_slice(extra);
    let (st, err) = start_node(None, addr, 0, TOKEN, &args).wait_exit(60);
    assert!(!st.success(), "a node with a failing pin joined:\n{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "the node retried a pin that cannot pass ({:?}):\n{err}",
        t0.elapsed()
    );
    assert!(
        err.contains(&format!("refusing the coordinator at {addr}")),
        "{err}"
    );
    err
}

/// `ringtune coordinator CFG` with `extra` arguments, which must fail before it listens;
/// returns its stderr.
fn coordinator_refuses(cfg: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "coordinator",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let (st, err) = spawn(&args, &[("RINGTUNE_TOKEN", TOKEN)]).wait_exit(30);
    assert!(!st.success(), "{err}");
    assert!(!err.contains("listening on"), "{err}");
    err
}

#[test]
fn nodes_pin_the_coordinators_fingerprint_and_refuse_another() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2, 3, "");
    // A file that is not a fingerprint is not replaced, and nothing starts.
    let precious = dir.path().join("notes.txt");
    std::fs::write(&precious, "keep me\n").unwrap();
    let err = coordinator_refuses(&cfg, &["--fingerprint-file", precious.to_str().unwrap()]);
    assert!(
        err.contains("does not hold a certificate fingerprint; refusing to replace it"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me\n");

    // A stale fingerprint in the file is removed before the coordinator listens, and the
    // file goes when the coordinator does.
    let fp_file = dir.path().join("coordinator.fingerprint");
    let stale = format!("sha256:{}", "ee".repeat(32));
    std::fs::write(&fp_file, format!("{stale}\n")).unwrap();
    let (mut coord, addr) = start_coordinator(
        None,
        cfg.to_str().unwrap(),
        &["--fingerprint-file", fp_file.to_str().unwrap()],
    );
    let shown = coord.wait_for("control certificate", 10);
    let pin = std::fs::read_to_string(&fp_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(pin.starts_with("sha256:") && pin.len() == 71, "{pin:?}");
    assert_ne!(pin, stale);
    assert!(
        shown.contains(&pin),
        "the file {pin} is not the printed {shown}"
    );

    // Another certificate's fingerprint: the node stops, and the coordinator says that a
    // connection failed its TLS handshake.
    let other = format!("sha256:{}", "0f".repeat(32));
    let err = refused(&addr, &["--coordinator-fingerprint", &other]);
    assert!(
        err.contains(&format!("its certificate is {pin}, not the pinned {other}")),
        "{err}"
    );
    coord.wait_for("failed its TLS handshake", 10);
    // Both variables set is ambiguous: refused before connecting.
    let (st, err) = spawn(
        &["node", "--coordinator", &addr],
        &[
            ("RINGTUNE_TOKEN", TOKEN),
            ("RINGTUNE_COORDINATOR_FINGERPRINT", &pin),
            ("RINGTUNE_COORDINATOR_CA", "/nonexistent.pem"),
        ],
    )
    .wait_exit(30);
    assert!(!st.success());
    assert!(
        err.contains("both RINGTUNE_COORDINATOR_FINGERPRINT and RINGTUNE_COORDINATOR_CA are set"),
        "{err}"
    );

    // The right one: as a flag, which overrides a (here wrong) variable; and from the
    // variable, in OpenSSL's colon form, with an empty CA variable counting as unset.
    let hex = &pin["sha256:".len()..];
    let colons: Vec<String> = (0..32)
        .map(|i| hex[2 * i..2 * i + 2].to_ascii_uppercase())
        .collect();
    let node = |slot: &str, pin_flag: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "node",
            "--coordinator",
            &addr,
            "--local-rank",
            slot,
            "--threads",
            "1",
        ];
        args.extend_from_slice(pin_flag);
        let mut vars = vec![("RINGTUNE_TOKEN", TOKEN), ("RAYON_NUM_THREADS", "1")];
        vars.extend_from_slice(env);
        spawn(&args, &vars)
    };
    let n0 = node(
        "0",
        &["--coordinator-fingerprint", &pin],
        &[("RINGTUNE_COORDINATOR_FINGERPRINT", &other)],
    );
    let openssl_form = format!("SHA256 Fingerprint={}", colons.join(":"));
    let n1 = node(
        "1",
        &[],
        &[
            ("RINGTUNE_COORDINATOR_FINGERPRINT", &openssl_form),
            ("RINGTUNE_COORDINATOR_CA", ""),
        ],
    );
    let (st, err) = coord.wait_exit(120);
    assert!(st.success(), "{err}");
    assert!(err.contains("done: 3 steps"), "{err}");
    assert!(
        !fp_file.exists(),
        "the fingerprint file outlived the coordinator"
    );
    for n in [n0, n1] {
        let (st, err) = n.wait_exit(30);
        assert!(st.success(), "{err}");
    }
}

#[test]
fn nodes_check_an_operators_certificate_against_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_leaf(dir.path(), "ours");
    let (other_ca, _, other_key) = ca_and_leaf(dir.path(), "theirs");
    let cfg = config(dir.path(), 1, 2, "");

    // A key that is not the certificate's is refused at start-up, naming both files.
    let err = coordinator_refuses(&cfg, &["--tls-cert", &cert, "--tls-key", &other_key]);
    assert!(
        err.contains(&format!("--tls-cert {cert} --tls-key {other_key}")),
        "{err}"
    );

    let (mut coord, addr) = start_coordinator(
        None,
        cfg.to_str().unwrap(),
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    coord.wait_for("control certificate", 10);
    // A host TLS cannot check a certificate for fails at once, not after the timeout.
    let port = addr.rsplit_once(':').unwrap().1;
    let t0 = Instant::now();
    let (st, err) = start_node(
        None,
        &format!("127.1:{port}"),
        0,
        TOKEN,
        &["--coordinator-ca", &ca, "--connect-timeout", "30"],
    )
    .wait_exit(60);
    assert!(
        !st.success() && t0.elapsed() < Duration::from_secs(20),
        "{err}"
    );
    assert!(
        err.contains("'127.1' is neither a DNS name nor an IP address"),
        "{err}"
    );
    let err = refused(&addr, &["--coordinator-ca", &other_ca]);
    assert!(
        err.contains(&format!(
            "against the CA file {other_ca} for the name 127.0.0.1"
        )),
        "{err}"
    );
    let n0 = start_node(None, &addr, 0, TOKEN, &["--coordinator-ca", &ca]);
    let (st, err) = coord.wait_exit(120);
    assert!(st.success(), "{err}");
    assert!(err.contains("done: 2 steps"), "{err}");
    let (st, err) = n0.wait_exit(30);
    assert!(st.success(), "{err}");
}

#[test]
fn an_expired_certificate_is_named_at_start_up_and_by_the_nodes_that_refuse_it() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_leaf_valid(dir.path(), "old", Some((2020, 2021)));
    let cfg = config(dir.path(), 1, 2, "");
    // It still starts (a fingerprint pin does not check dates), with a warning.
    let (mut coord, addr) = start_coordinator(
        None,
        cfg.to_str().unwrap(),
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    let line = coord.wait_for("control certificate", 10);
    let warning = coord.seen.join("\n");
    assert!(
        warning.contains(&format!(
            "--tls-cert {cert} expired on 2021-01-01 00:00:00 UTC"
        )),
        "{warning}"
    );
    let fingerprint = line
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_string();
    // A node pinning the CA refuses it at once, saying why; one pinning the fingerprint
    // trains.
    let err = refused(&addr, &["--coordinator-ca", &ca]);
    assert!(err.to_lowercase().contains("expired"), "{err}");
    let n0 = start_node(
        None,
        &addr,
        0,
        TOKEN,
        &["--coordinator-fingerprint", &fingerprint],
    );
    let (st, err) = coord.wait_exit(120);
    assert!(st.success() && err.contains("done: 2 steps"), "{err}");
    assert!(n0.wait_exit(30).0.success());
}
