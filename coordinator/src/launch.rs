//! Launcher environment: the variables `srun` and torchrun-style launchers set,
//! turned into a [`LaunchEnv`] (this process's rank, the world size, its GPU
//! slot, and where the coordinator listens).
//!
//! Pure functions over a variable lookup: tests pass a map, the binary passes
//! the process environment. Nothing here resolves host names or opens sockets,
//! and nothing here decides ranks for the run: the coordinator assigns those,
//! using the launcher's rank only as a sort key.
//!
//! Precedence: torchrun's variables (`RANK`, `WORLD_SIZE`, ...) win over
//! Slurm's, because torchrun started inside an `srun` task sets them per
//! worker while the `SLURM_*` ones describe the whole task.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The coordinator port when the environment names none (torchrun's default
/// `MASTER_PORT`, so sites that open that port for torchrun work unchanged).
pub const DEFAULT_COORDINATOR_PORT: u16 = 29500;

/// The most hosts a host list may expand to: the list comes from the
/// environment, and a typo like `gpu[1-99999999]` must be an error, not an
/// out-of-memory.
pub const MAX_HOSTS: usize = 65_536;

/// Which launcher the variables came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Launcher {
    /// torchrun / torch.distributed.run (and launchers that copy its variables).
    Torchrun,
    /// A Slurm `srun` task.
    Slurm,
}

/// `host:port` of the coordinator. The host stays a name: resolving it is the
/// driver's business.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for CoordinatorAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            // An IPv6 literal needs brackets to be followed by a port.
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What the launcher told this process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchEnv {
    pub launcher: Launcher,
    /// The launcher's global rank of this process (`RANK` / `SLURM_PROCID`).
    pub rank: u32,
    /// The number of processes the launcher started (`WORLD_SIZE` / `SLURM_NTASKS`).
    pub world_size: u32,
    /// This process's slot on its host (`LOCAL_RANK` / `SLURM_LOCALID`): the GPU
    /// it uses when no `--device` is given.
    pub local_rank: u32,
    pub coordinator_addr: CoordinatorAddr,
}

impl LaunchEnv {
    /// Reads the process environment. `Ok(None)` when no launcher variables are set.
    pub fn from_process_env() -> Result<Option<LaunchEnv>> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// Reads the variables through `get`. `Ok(None)` when neither torchrun's
    /// `RANK`/`WORLD_SIZE` nor Slurm's `SLURM_PROCID` is set; an error naming the
    /// variable and its value when the detected launcher's variables are
    /// missing or malformed.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let vars = Vars { get: &get };
        if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let because = "RANK or WORLD_SIZE is set (torchrun-style launch)";
            let rank = vars.number("RANK", because)?;
            let world_size = vars.number("WORLD_SIZE", because)?;
            let local_rank = vars.number("LOCAL_RANK", because)?;
            let host = vars.host("MASTER_ADDR", because)?;
            let port = vars.port("MASTER_PORT", because)?;
            return finish(
                Launcher::Torchrun,
                rank,
                world_size,
                local_rank,
                host,
                port,
                "RANK",
                "WORLD_SIZE",
            )
            .map(Some);
        }
        if get("SLURM_PROCID").is_some() {
            let because = "SLURM_PROCID is set (Slurm task)";
            let rank = vars.number("SLURM_PROCID", because)?;
            // SLURM_NPROCS is the older spelling of SLURM_NTASKS.
            let world_size = if get("SLURM_NTASKS").is_none() && get("SLURM_NPROCS").is_some() {
                vars.number("SLURM_NPROCS", because)?
            } else {
                vars.number("SLURM_NTASKS", because)?
            };
            let local_rank = vars.number("SLURM_LOCALID", because)?;
            // An explicit MASTER_ADDR (many sbatch scripts export one) beats the
            // derived first host of the allocation.
            let host = if get("MASTER_ADDR").is_some() {
                vars.host("MASTER_ADDR", because)?
            } else {
                let var = [
                    "SLURM_NODELIST",
                    "SLURM_JOB_NODELIST",
                    "SLURM_STEP_NODELIST",
                ]
                .into_iter()
                .find(|v| get(v).is_some())
                .unwrap_or("SLURM_NODELIST");
                let list = vars.required(var, because)?;
                first_host(&list).map_err(|e| Error::LaunchVar {
                    var: var.to_string(),
                    value: list.clone(),
                    reason: match e {
                        Error::Hostlist { reason, .. } => reason,
                        other => other.to_string(),
                    },
                })?
            };
            let port = if get("MASTER_PORT").is_some() {
                vars.port("MASTER_PORT", because)?
            } else {
                DEFAULT_COORDINATOR_PORT
            };
            return finish(
                Launcher::Slurm,
                rank,
                world_size,
                local_rank,
                host,
                port,
                "SLURM_PROCID",
                "SLURM_NTASKS",
            )
            .map(Some);
        }
        Ok(None)
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    launcher: Launcher,
    rank: u32,
    world_size: u32,
    local_rank: u32,
    host: String,
    port: u16,
    rank_var: &str,
    world_var: &str,
) -> Result<LaunchEnv> {
    if world_size == 0 {
        return Err(Error::LaunchVar {
            var: world_var.to_string(),
            value: "0".to_string(),
            reason: "the world size must be at least 1".to_string(),
        });
    }
    if rank >= world_size {
        return Err(Error::LaunchVar {
            var: rank_var.to_string(),
            value: rank.to_string(),
            reason: format!("rank must be below {world_var}={world_size}"),
        });
    }
    Ok(LaunchEnv {
        launcher,
        rank,
        world_size,
        local_rank,
        coordinator_addr: CoordinatorAddr { host, port },
    })
}

struct Vars<'a, F: Fn(&str) -> Option<String>> {
    get: &'a F,
}

impl<F: Fn(&str) -> Option<String>> Vars<'_, F> {
    fn required(&self, var: &str, because: &str) -> Result<String> {
        (self.get)(var).ok_or_else(|| Error::LaunchVarMissing {
            var: var.to_string(),
            because: because.to_string(),
        })
    }

    fn bad(var: &str, value: &str, reason: impl Into<String>) -> Error {
        Error::LaunchVar {
            var: var.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn number(&self, var: &str, because: &str) -> Result<u32> {
        let value = self.required(var, because)?;
        value
            .trim()
            .parse::<u32>()
            .map_err(|_| Self::bad(var, &value, "expected a non-negative integer"))
    }

    fn port(&self, var: &str, because: &str) -> Result<u16> {
        let value = self.required(var, because)?;
        match value.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(Self::bad(var, &value, "expected a port number 1..=65535")),
            Ok(p) => Ok(p),
        }
    }

    fn host(&self, var: &str, because: &str) -> Result<String> {
        let value = self.required(var, because)?;
        let host = value.trim();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(Self::bad(
                var,
                &value,
                "expected a host name or address, got nothing",
            ));
        }
        if host.len() > 253
            || host
                .chars()
                .any(|c| c.is_whitespace() || c == '/' || c == ',')
        {
            return Err(Self::bad(
                var,
                &value,
                "expected a single host name or address",
            ));
        }
        Ok(host.to_string())
    }
}

/// One `[...]` group: ranges of numbers, each printed zero-padded to the width
/// of its lower bound as written (`01-04` → `01, 02, 03, 04`), as Slurm does.
#[derive(Debug, Clone, Copy)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

#[derive(Debug)]
enum Part {
    Literal(String),
    Ranges(Vec<Range>),
}

/// Splits a host list at top-level commas and parses each entry into literal
/// and bracketed parts (`rack[1-2]-gpu[01-04]` has four parts).
fn parse_hostlist(list: &str) -> Result<Vec<Vec<Part>>> {
    let err = |reason: String| Error::Hostlist {
        list: list.to_string(),
        reason,
    };
    let trimmed = list.trim();
    if trimmed.is_empty() {
        return Err(err("empty host list".to_string()));
    }
    let mut entries = Vec::new();
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = trimmed.char_indices();
    while let Some((pos, c)) = chars.next() {
        match c {
            ',' => {
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                if parts.is_empty() {
                    return Err(err(format!(
                        "empty host name before the comma at byte {pos}"
                    )));
                }
                entries.push(std::mem::take(&mut parts));
            }
            '[' => {
                let mut body = String::new();
                let mut closed = false;
                for (_, c) in chars.by_ref() {
                    match c {
                        ']' => {
                            closed = true;
                            break;
                        }
                        '[' => {
                            return Err(err(format!(
                                "nested '[' in the bracket opened at byte {pos}"
                            )))
                        }
                        c => body.push(c),
                    }
                }
                if !closed {
                    return Err(err(format!("'[' at byte {pos} is never closed")));
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Ranges(
                    parse_ranges(&body).map_err(|r| err(format!("[{body}]: {r}")))?,
                ));
            }
            ']' => return Err(err(format!("']' at byte {pos} without a matching '['"))),
            c if c.is_whitespace() => return Err(err(format!("whitespace at byte {pos}"))),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    if parts.is_empty() {
        return Err(err("the list ends with a comma".to_string()));
    }
    entries.push(parts);
    Ok(entries)
}

fn parse_ranges(body: &str) -> std::result::Result<Vec<Range>, String> {
    let mut ranges = Vec::new();
    for item in body.split(',') {
        let (lo_s, hi_s) = item.split_once('-').unwrap_or((item, item));
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo_s) || !digits(hi_s) {
            return Err(format!("{item:?} is not a number or a range like 01-04"));
        }
        // Both sides are ≤ 18 ASCII digits, so they fit a u64.
        let lo: u64 = lo_s
            .parse()
            .map_err(|_| format!("{lo_s:?} is not a number"))?;
        let hi: u64 = hi_s
            .parse()
            .map_err(|_| format!("{hi_s:?} is not a number"))?;
        if lo > hi {
            return Err(format!("range {item:?} runs backwards"));
        }
        ranges.push(Range {
            lo,
            hi,
            width: lo_s.len(),
        });
    }
    Ok(ranges)
}

/// The first host of a Slurm host list (`gpu[01-04,07]` → `gpu01`): where the
/// batch script runs, and so where the coordinator listens. Does not expand
/// the whole list.
pub fn first_host(list: &str) -> Result<String> {
    let entries = parse_hostlist(list)?;
    let mut host = String::new();
    for part in &entries[0] {
        match part {
            Part::Literal(s) => host.push_str(s),
            Part::Ranges(r) => host.push_str(&format!("{:0w$}", r[0].lo, w = r[0].width)),
        }
    }
    Ok(host)
}

/// Expands a Slurm host list (`gpu[01-04,07],login1` → `gpu01 … gpu04 gpu07
/// login1`), in order, with several bracket groups in one name multiplied out
/// as Slurm does. At most [`MAX_HOSTS`] names.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>> {
    let too_many = || Error::Hostlist {
        list: list.to_string(),
        reason: format!("expands to more than {MAX_HOSTS} hosts"),
    };
    let mut hosts = Vec::new();
    for entry in parse_hostlist(list)? {
        let mut names = vec![String::new()];
        for part in &entry {
            match part {
                Part::Literal(s) => names.iter_mut().for_each(|n| n.push_str(s)),
                Part::Ranges(ranges) => {
                    let mut count: u64 = 0;
                    for r in ranges {
                        count = count.saturating_add(r.hi - r.lo + 1);
                    }
                    if count
                        .saturating_mul(names.len() as u64)
                        .saturating_add(hosts.len() as u64)
                        > MAX_HOSTS as u64
                    {
                        return Err(too_many());
                    }
                    let mut next = Vec::with_capacity(names.len() * count as usize);
                    for n in &names {
                        for r in ranges {
                            for i in r.lo..=r.hi {
                                next.push(format!("{n}{i:0w$}", w = r.width));
                            }
                        }
                    }
                    names = next;
                }
            }
        }
        hosts.extend(names);
        if hosts.len() > MAX_HOSTS {
            return Err(too_many());
        }
    }
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Parses `VAR=value` pairs (space separated) into an environment and
    /// renders the outcome as one line, so each case is a row of data.
    fn check(env: &str, expect: &str) {
        let vars: BTreeMap<String, String> = env
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("test env is VAR=value");
                (k.to_string(), v.to_string())
            })
            .collect();
        let got = match LaunchEnv::from_lookup(|k| vars.get(k).cloned()) {
            Ok(None) => "none".to_string(),
            Ok(Some(e)) => format!(
                "{:?} rank={} world={} local={} coordinator={}",
                e.launcher, e.rank, e.world_size, e.local_rank, e.coordinator_addr
            ),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "env: {env}");
    }

    #[test]
    fn launcher_environments() {
        check("", "none");
        check("HOME=/root SLURM_JOB_ID=5", "none");
        check(
            "RANK=3 WORLD_SIZE=8 LOCAL_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=1234",
            "Torchrun rank=3 world=8 local=1 coordinator=10.0.0.1:1234",
        );
        check(
            "RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=[fe80::1] MASTER_PORT=29400",
            "Torchrun rank=0 world=2 local=0 coordinator=[fe80::1]:29400",
        );
        check(
            "SLURM_PROCID=5 SLURM_NTASKS=16 SLURM_LOCALID=1 SLURM_NODELIST=gpu[01-04,07]",
            "Slurm rank=5 world=16 local=1 coordinator=gpu01:29500",
        );
        check(
            "SLURM_PROCID=0 SLURM_NPROCS=2 SLURM_LOCALID=0 SLURM_JOB_NODELIST=a,b MASTER_PORT=7000",
            "Slurm rank=0 world=2 local=0 coordinator=a:7000",
        );
        check(
            "SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_LOCALID=1 SLURM_NODELIST=gpu[01-02] MASTER_ADDR=head",
            "Slurm rank=1 world=2 local=1 coordinator=head:29500",
        );
        // torchrun inside an srun task: torchrun's per-worker variables win.
        check(
            "SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0 SLURM_NODELIST=n[1-2] \
             RANK=6 WORLD_SIZE=8 LOCAL_RANK=2 MASTER_ADDR=n1 MASTER_PORT=29500",
            "Torchrun rank=6 world=8 local=2 coordinator=n1:29500",
        );
    }

    #[test]
    fn launcher_errors_name_variable_and_value() {
        check(
            "RANK=1 LOCAL_RANK=0 MASTER_ADDR=h MASTER_PORT=1",
            "error: launcher variable WORLD_SIZE is not set, but RANK or WORLD_SIZE is set (torchrun-style launch)",
        );
        check(
            "RANK=x WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=h MASTER_PORT=1",
            "error: launcher variable RANK=\"x\": expected a non-negative integer",
        );
        check(
            "RANK=2 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=h MASTER_PORT=1",
            "error: launcher variable RANK=\"2\": rank must be below WORLD_SIZE=2",
        );
        check(
            "RANK=0 WORLD_SIZE=0 LOCAL_RANK=0 MASTER_ADDR=h MASTER_PORT=1",
            "error: launcher variable WORLD_SIZE=\"0\": the world size must be at least 1",
        );
        check(
            "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=h MASTER_PORT=70000",
            "error: launcher variable MASTER_PORT=\"70000\": expected a port number 1..=65535",
        );
        check(
            "RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=a,b MASTER_PORT=1",
            "error: launcher variable MASTER_ADDR=\"a,b\": expected a single host name or address",
        );
        check(
            "SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_NODELIST=a",
            "error: launcher variable SLURM_LOCALID is not set, but SLURM_PROCID is set (Slurm task)",
        );
        check(
            "SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0 SLURM_NODELIST=gpu[01-",
            "error: launcher variable SLURM_NODELIST=\"gpu[01-\": '[' at byte 3 is never closed",
        );
        check(
            "SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0",
            "error: launcher variable SLURM_NODELIST is not set, but SLURM_PROCID is set (Slurm task)",
        );
    }

    fn check_list(list: &str, expect: &str) {
        let got = match expand_hostlist(list) {
            Ok(hosts) => {
                // The cheap first-host path must agree with full expansion.
                assert_eq!(first_host(list).unwrap(), hosts[0], "first host of {list}");
                hosts.join(" ")
            }
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(got, expect, "list: {list}");
    }

    #[test]
    fn host_lists() {
        check_list("gpu01", "gpu01");
        check_list("gpu[01-04,07]", "gpu01 gpu02 gpu03 gpu04 gpu07");
        check_list("n[8-11]", "n8 n9 n10 n11");
        check_list("n[098-101]", "n098 n099 n100 n101");
        check_list("a,b[1-2],c", "a b1 b2 c");
        check_list("gpu[3,1]-ib", "gpu3-ib gpu1-ib");
        check_list(
            "rack[1-2]-gpu[01-02]",
            "rack1-gpu01 rack1-gpu02 rack2-gpu01 rack2-gpu02",
        );
        check_list("node-a.cluster.org", "node-a.cluster.org");
        check_list("", "error: host list \"\": empty host list");
        check_list(
            "a,,b",
            "error: host list \"a,,b\": empty host name before the comma at byte 2",
        );
        check_list("a,", "error: host list \"a,\": the list ends with a comma");
        check_list(
            "g[4-2]",
            "error: host list \"g[4-2]\": [4-2]: range \"4-2\" runs backwards",
        );
        check_list(
            "g[x]",
            "error: host list \"g[x]\": [x]: \"x\" is not a number or a range like 01-04",
        );
        check_list(
            "g[1-2]]",
            "error: host list \"g[1-2]]\": ']' at byte 6 without a matching '['",
        );
        check_list(
            "g[[1]]",
            "error: host list \"g[[1]]\": nested '[' in the bracket opened at byte 1",
        );
        check_list(
            "g[1-99999999]",
            "error: host list \"g[1-99999999]\": expands to more than 65536 hosts",
        );
        check_list(
            "a[1-300]b[1-300]",
            "error: host list \"a[1-300]b[1-300]\": expands to more than 65536 hosts",
        );
    }

    #[test]
    fn first_host_does_not_expand_huge_lists() {
        assert_eq!(first_host("g[0001-9999]x[1-9999]").unwrap(), "g0001x1");
    }
}
