//! `pdsno bench soak`: does a topology at work stay flat? Runs `pdsno demo --keep-running`
//! (a GC, `--regions` RCs, `--locals` LCs per region, discovery every
//! `--discovery-interval` seconds; the demo kills its last LC at the start, so use at least
//! two per region) and
//! every `--every` seconds prints, per tier, the resident memory and the NIB size (database
//! and write-ahead log) of its largest node. At the end it prints each series' slope per
//! hour after `--warm-up` minutes (least squares), the number to watch for a box that runs
//! for years.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `pdsno bench soak` arguments.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Minutes to run.
    #[arg(long, default_value_t = 30)]
    pub minutes: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60)]
    pub every: u64,
    /// Minutes left out of the slopes (start-up, first full reports, caches filling).
    #[arg(long, default_value_t = 5)]
    pub warm_up: u64,
    /// Regional controllers.
    #[arg(long, default_value_t = 2)]
    pub regions: usize,
    /// Local controllers per regional controller (the demo kills one of the last region's).
    #[arg(long, default_value_t = 10)]
    pub locals: usize,
    /// Seconds between discovery cycles.
    #[arg(long, default_value_t = 1)]
    pub discovery_interval: u64,
}

/// One node of the topology: its tier, process and data directory.
struct Member {
    tier: &'static str,
    pid: u32,
    data: PathBuf,
}

/// One sample: per tier, the largest RSS and NIB (KiB).
#[derive(Clone, Copy, Default)]
struct Sample {
    minutes: f64,
    rss: [u64; 3],
    nib: [u64; 3],
}

const TIERS: [&str; 3] = ["global", "regional", "local"];

/// Runs the soak.
///
/// # Errors
/// When the topology does not come up or stops early.
pub async fn soak(a: &SoakArgs) -> Result<(), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the pdsno executable: {e}"))?;
    let mut demo = tokio::process::Command::new(&exe)
        .args([
            "demo",
            "--keep-running",
            "--regions",
            &a.regions.to_string(),
            "--locals",
            &a.locals.to_string(),
            "--discovery-interval",
            &a.discovery_interval.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the demo: {e}"))?;
    let pid = demo.id().ok_or("the demo exited at once")?;
    let out = demo.stdout.take().ok_or("no demo output")?;
    let mut lines = BufReader::new(out).lines();
    let mut data_dir = None;
    loop {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .map_err(|_| "the topology did not come up within 5 minutes")?
            .map_err(|e| e.to_string())?
            .ok_or("the demo ended before the topology was up (see its output above)")?;
        if let Some(d) = line.strip_prefix("data and logs: ") {
            data_dir = d.split(' ').next().map(PathBuf::from);
        }
        if line.starts_with("running;") {
            break;
        }
    }
    let data_dir = data_dir.ok_or("the demo did not say where its data is")?;
    // The demo's output from now on is not needed; keep the pipe drained.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    println!(
        "soak: 1 global, {} regional, {} local controllers (discovery every {} s), {} min, a sample every {} s",
        a.regions,
        a.regions * a.locals,
        a.discovery_interval,
        a.minutes,
        a.every
    );
    println!(
        "{:>6}  {:>9} {:>9}  {:>9} {:>9}  {:>9} {:>9}",
        "min", "GC rss", "GC nib", "RC rss", "RC nib", "LC rss", "LC nib"
    );
    let start = Instant::now();
    let end = start + Duration::from_secs(a.minutes * 60);
    let mut samples = Vec::new();
    loop {
        let members = members(pid, &data_dir);
        if members.is_empty() {
            return Err("the topology stopped".into());
        }
        let s = sample(&members, start.elapsed().as_secs_f64() / 60.0);
        let cols: Vec<String> = (0..3)
            .map(|i| {
                if s.rss[i] == 0 {
                    // No node of this tier runs (the demo's one local controller was killed).
                    format!("{:>9} {:>9}", "-", "-")
                } else {
                    format!("{:>5} MiB {:>5} KiB", s.rss[i] / 1024, s.nib[i])
                }
            })
            .collect();
        println!("{:>6.1}  {}", s.minutes, cols.join("  "));
        samples.push(s);
        if Instant::now() >= end {
            break;
        }
        tokio::time::sleep(Duration::from_secs(a.every.max(1))).await;
        if let Ok(Some(status)) = demo.try_wait() {
            return Err(format!("the demo stopped ({status})"));
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(30), demo.wait()).await;
    let after: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.minutes >= a.warm_up as f64)
        .collect();
    println!();
    if after.len() < 3 {
        println!(
            "slopes: too few samples after the warm-up ({})",
            after.len()
        );
        return Ok(());
    }
    println!(
        "slopes per hour after {} min ({} samples, largest node of each tier):",
        a.warm_up,
        after.len()
    );
    for (i, tier) in TIERS.iter().enumerate() {
        let rss = slope(&after, |s| s.rss[i] as f64) * 60.0 / 1024.0;
        let nib = slope(&after, |s| s.nib[i] as f64) * 60.0;
        println!("  {tier:<8}  RSS {rss:+8.2} MiB/h   NIB {nib:+9.1} KiB/h");
    }
    Ok(())
}

/// The demo's child processes, with their tier and data directory (from their arguments).
fn members(demo: u32, data_dir: &Path) -> Vec<Member> {
    // Every process whose parent is the demo (from /proc/N/stat: the field after the
    // command name in parentheses is the state, then the parent's pid).
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|st| {
                            let rest = &st[st.rfind(')')? + 1..];
                            rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                        })
                        == Some(demo)
                })
                .collect()
        })
        .unwrap_or_default();
    children
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let tier = TIERS
                .iter()
                .find(|t| args.get(1).map(String::as_str) == Some(**t))?;
            let data = args
                .iter()
                .position(|a| a == "--data-dir")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)?;
            data.starts_with(data_dir)
                .then_some(Member { tier, pid, data })
        })
        .collect()
}

fn sample(members: &[Member], minutes: f64) -> Sample {
    let mut s = Sample {
        minutes,
        ..Sample::default()
    };
    for m in members {
        let Some(i) = TIERS.iter().position(|t| *t == m.tier) else {
            continue;
        };
        let rss = super::lab::rss_kib(m.pid).unwrap_or(0);
        let nib: u64 = ["nib.db", "nib.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(m.data.join(f)).ok())
            .map(|md| md.len())
            .sum::<u64>()
            / 1024;
        s.rss[i] = s.rss[i].max(rss);
        s.nib[i] = s.nib[i].max(nib);
    }
    s
}

/// Least-squares slope of `y` against minutes (per minute).
fn slope(samples: &[Sample], y: impl Fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    let mx = samples.iter().map(|s| s.minutes).sum::<f64>() / n;
    let my = samples.iter().map(&y).sum::<f64>() / n;
    let (num, den) = samples.iter().fold((0.0, 0.0), |(num, den), s| {
        let dx = s.minutes - mx;
        (num + dx * (y(s) - my), den + dx * dx)
    });
    if den == 0.0 { 0.0 } else { num / den }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slope_of_a_line_is_its_gradient_and_flat_is_zero() {
        let line: Vec<Sample> = (0..10)
            .map(|i| Sample {
                minutes: f64::from(i),
                rss: [100 + 3 * i as u64, 50, 50],
                ..Sample::default()
            })
            .collect();
        assert!((slope(&line, |s| s.rss[0] as f64) - 3.0).abs() < 1e-9);
        assert!(slope(&line, |s| s.rss[1] as f64).abs() < 1e-9);
        assert_eq!(slope(&line[..1], |s| s.rss[0] as f64), 0.0);
    }
}
