//! Where a model folder is: a path, or `hf:ORG/NAME[@REV]` in the standard Hugging Face
//! cache layout (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`):
//! `models--ORG--NAME/snapshots/<commit>`, with `refs/<REV>` naming the commit of a branch
//! or tag (default `main`).
//!
//! Resolution reads the cache. Only with the cargo feature `hub`, and only when the cache
//! lacks the model and `HF_HUB_OFFLINE` is not set, does [`resolve_model_dir`] download it
//! (config, weights — single file or every shard of the index — and tokenizer files) into the
//! same layout with the hf-hub crate. Without the feature, fill the cache with
//! `huggingface-cli download ORG/NAME` (or any HF client).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A parsed model spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A folder on disk.
    Path(PathBuf),
    /// A Hub repository at a revision (branch, tag or commit).
    Hub {
        /// `ORG/NAME`.
        repo: String,
        /// Branch, tag or 40-hex commit (default `main`).
        revision: String,
    },
}

fn valid_repo_part(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_revision(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.split('/').any(|p| p.is_empty() || p == "." || p == "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl ModelSpec {
    /// Parses `hf:ORG/NAME[@REV]` or a path.
    pub fn parse(spec: &str) -> Result<Self> {
        let Some(rest) = spec.strip_prefix("hf:") else {
            return Ok(ModelSpec::Path(PathBuf::from(spec)));
        };
        let bad = |reason: &str| Error::ModelNotFound {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, rev),
            None => (rest, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || !parts.iter().all(|p| valid_repo_part(p)) {
            return Err(bad("expected hf:ORG/NAME[@REV] with ORG and NAME made of letters, digits, '-', '_', '.'"));
        }
        if !valid_revision(revision) {
            return Err(bad("invalid revision after '@'"));
        }
        Ok(ModelSpec::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// The Hub cache folder from the environment, as huggingface_hub picks it.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// Finds `repo` at `revision` in the cache rooted at `cache`.
pub fn resolve_in_cache(cache: &Path, repo: &str, revision: &str) -> Result<PathBuf> {
    let spec = format!("hf:{repo}@{revision}");
    let not_found = |reason: String| Error::ModelNotFound {
        spec: spec.clone(),
        reason,
    };
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(not_found(format!(
            "not in the Hugging Face cache ({} does not exist); download it first, e.g. `huggingface-cli download {repo}`",
            repo_dir.display()
        )));
    }
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        let r = repo_dir.join("refs").join(revision);
        let text = std::fs::read_to_string(&r)
            .map_err(|e| not_found(format!("cannot read {}: {e}", r.display())))?;
        let c = text.trim().to_string();
        if !(c.len() == 40 && c.chars().all(|ch| ch.is_ascii_hexdigit())) {
            return Err(not_found(format!(
                "{} does not hold a commit hash",
                r.display()
            )));
        }
        c
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.join("config.json").is_file() {
        return Err(not_found(format!("{} has no config.json", snap.display())));
    }
    Ok(snap)
}

/// Resolves a model spec to a folder holding config.json.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    match ModelSpec::parse(spec)? {
        ModelSpec::Path(p) => {
            if p.join("config.json").is_file() {
                Ok(p)
            } else {
                Err(Error::ModelNotFound {
                    spec: spec.to_string(),
                    reason: format!("{} has no config.json", p.display()),
                })
            }
        }
        ModelSpec::Hub { repo, revision } => {
            let cache = hf_cache_dir();
            match resolve_in_cache(&cache, &repo, &revision) {
                Ok(p) => Ok(p),
                #[cfg(feature = "hub")]
                Err(Error::ModelNotFound { .. })
                    if std::env::var_os("HF_HUB_OFFLINE")
                        .is_none_or(|v| v.is_empty() || v == "0") =>
                {
                    download(&cache, &repo, &revision)?;
                    resolve_in_cache(&cache, &repo, &revision)
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// Downloads a model's files into the cache at `cache` (feature `hub`).
#[cfg(feature = "hub")]
fn download(cache: &Path, repo: &str, revision: &str) -> Result<()> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};

    let spec = format!("hf:{repo}@{revision}");
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::Download {
        spec: spec.clone(),
        reason: format!("{what}: {e}"),
    };
    let api = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(false)
        .build()
        .map_err(|e| fail("client", &e))?;
    let r = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    r.get("config.json").map_err(|e| fail("config.json", &e))?;
    match r.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index.clone(),
                    source,
                })?;
            let mut shards: Vec<&str> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::MissingField {
                    path: index.clone(),
                    field: "weight_map".into(),
                })?
                .values()
                .filter_map(|f| f.as_str())
                .collect();
            shards.sort_unstable();
            shards.dedup();
            for f in shards {
                if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                    return Err(fail(
                        "index",
                        &format!("shard name {f:?} is not a plain file name"),
                    ));
                }
                r.get(f).map_err(|e| fail(f, &e))?;
            }
        }
        Err(_) => {
            r.get("model.safetensors")
                .map_err(|e| fail("model.safetensors", &e))?;
        }
    }
    // Optional files: a model without them is still a model.
    for f in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let _ = r.get(f);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn fake_cache() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("models--Org--Name");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(COMMIT)).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{COMMIT}\n")).unwrap();
        std::fs::write(repo.join("refs/v1"), COMMIT).unwrap();
        std::fs::write(
            repo.join("snapshots").join(COMMIT).join("config.json"),
            "{}",
        )
        .unwrap();
        d
    }

    #[test]
    fn parses_specs() {
        assert_eq!(
            ModelSpec::parse("./m").unwrap(),
            ModelSpec::Path("./m".into())
        );
        assert_eq!(
            ModelSpec::parse("hf:Org/Name").unwrap(),
            ModelSpec::Hub {
                repo: "Org/Name".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            ModelSpec::parse("hf:Org/Na.me-1@refs/pr/1").unwrap(),
            ModelSpec::Hub {
                repo: "Org/Na.me-1".into(),
                revision: "refs/pr/1".into()
            }
        );
        for bad in [
            "hf:Org",
            "hf:Org/Name/x",
            "hf:../x",
            "hf:Org/..",
            "hf:Org/Name@../../etc",
            "hf:Org/Name@",
            "hf:O rg/N",
        ] {
            assert!(
                matches!(ModelSpec::parse(bad), Err(Error::ModelNotFound { .. })),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn resolves_refs_and_commits_in_a_fake_cache() {
        let c = fake_cache();
        let want = c.path().join("models--Org--Name/snapshots").join(COMMIT);
        assert_eq!(
            resolve_in_cache(c.path(), "Org/Name", "main").unwrap(),
            want
        );
        assert_eq!(resolve_in_cache(c.path(), "Org/Name", "v1").unwrap(), want);
        assert_eq!(
            resolve_in_cache(c.path(), "Org/Name", COMMIT).unwrap(),
            want
        );
    }

    #[test]
    fn misses_name_the_path_tried() {
        let c = fake_cache();
        let e = resolve_in_cache(c.path(), "Org/Other", "main")
            .unwrap_err()
            .to_string();
        assert!(e.contains("models--Org--Other"), "{e}");
        let e = resolve_in_cache(c.path(), "Org/Name", "nope")
            .unwrap_err()
            .to_string();
        assert!(e.contains("refs/nope") || e.contains("refs\\nope"), "{e}");
        let e = resolve_in_cache(c.path(), "Org/Name", &"f".repeat(40))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no config.json"), "{e}");
    }
}
