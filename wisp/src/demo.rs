//! `wisp demo`: the whole story on a simulated cluster on this machine, in a few minutes.
//!
//! One server and three workstations come up in their own namespaces; the demo shows a
//! write on one host read at once on another, a parallel build whose recipes run on idle
//! hosts through rexec (with a live view of where jobs run), a long-running job migrated
//! between hosts while its output keeps streaming, and an eviction when an owner comes
//! back. It ends with a report of what happened, with timings, and tears everything down.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use wisp_cluster::{Cluster, Spec};

struct Demo {
    c: Cluster,
    wisp: std::path::PathBuf,
    t0: Instant,
    step: u32,
    report: Vec<(String, String)>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::env::var_os("WISP_DEMO_KEEP").is_none() {
            let _ = wisp_cluster::down(&self.c.name);
        }
    }
}

impl Demo {
    fn say(&mut self, what: &str) {
        self.step += 1;
        println!(
            "\n\x1b[1m[{}] {what}\x1b[0m  (t+{:.1}s)",
            self.step,
            self.t0.elapsed().as_secs_f64()
        );
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.wisp)
            .args(args)
            .args(["--cluster", &self.c.name])
            .output()?;
        if !out.status.success() {
            bail!(
                "wisp {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn on(&self, host: &str, script: &str) -> Result<String> {
        self.c.sh_ok(host, script).map_err(|e| anyhow!("{e}"))
    }

    /// (job, host) of the jobs running now.
    fn jobs(&self) -> Vec<(String, String)> {
        self.cli(&["jobs"])
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4).then(|| (f[0].to_string(), f[3].to_string()))
            })
            .collect()
    }
}

const PROJECT: &str = r#"set -e; rm -rf /wisp/demo && mkdir -p /wisp/demo/proj && cd /wisp/demo/proj
for i in $(seq 1 24); do
  { printf '#include <math.h>\n'; for k in $(seq 1 40); do printf 'double f%d_%d(double x) { double s = 0; for (int i = 0; i < 100; i++) s += sin(x + i * %d); return s; }\n' $i $k $k; done
    printf 'double f%d(double x) { return ' $i; for k in $(seq 1 40); do printf 'f%d_%d(x) + ' $i $k; done; printf '0; }\n'; } > f$i.c
done
{ echo '#include <stdio.h>'; for i in $(seq 1 24); do echo "double f$i(double);"; done
  echo 'int main(void) { double s = 0;'; for i in $(seq 1 24); do echo "s += f$i(1.0);"; done; printf '%s\n' 'printf("result %.3f\n", s); return 0; }'; } > main.c
printf 'OBJS := $(patsubst %%.c,%%.o,$(wildcard *.c))\napp: $(OBJS)\n\tcc -o $@ $(OBJS) -lm\n%%.o: %%.c\n\tcc -O2 -c $< -o $@\nclean:\n\trm -f app *.o\n' > Makefile"#;

const TICKER: &str = r#"cd /wisp/demo && rexec -v perl -e '$|=1; use POSIX; my $mem = "m" x 20_000_000; for my $i (1..60) { printf("tick %2d  pid %d  uts %s\n", $i, $$, (POSIX::uname())[1]); select(undef, undef, undef, 0.15) }'"#;

pub fn run(name: &str) -> Result<()> {
    let t0 = Instant::now();
    println!("wisp demo: a simulated cluster of 1 file server and 3 workstations on this machine");
    let mut spec = Spec::new(name, 1, 3);
    spec.log = "info,openraft=warn".into();
    let c = Cluster::up(&spec).context("bringing up the simulated cluster")?;
    let wisp = c.bin_dir.join("wisp");
    let mut d = Demo {
        c,
        wisp,
        t0,
        step: 0,
        report: vec![],
    };
    d.report.push((
        "cluster up (4 hosts, /wisp mounted)".into(),
        format!("{:.1} s", t0.elapsed().as_secs_f64()),
    ));
    d.step += 1;
    println!("\n\x1b[1m[1] cluster up\x1b[0m\n{}", d.c.status());

    d.say("one namespace: ws1 writes, ws2 and ws3 read at once");
    let t = Instant::now();
    d.on(
        "ws1",
        "echo \"written on $(uname -n) at $(date +%T.%N)\" > /wisp/hello",
    )?;
    for h in ["ws2", "ws3"] {
        print!("  {h} reads: {}", d.on(h, "cat /wisp/hello")?);
    }
    d.report.push((
        "write on ws1 -> read on ws2, ws3".into(),
        format!("{:.0} ms", t.elapsed().as_secs_f64() * 1e3),
    ));

    d.say("parallel build: make -j6 SHELL=rexec on ws1, recipes on idle ws2 and ws3");
    d.cli(&["owner", "ws2", "idle"])?;
    d.cli(&["owner", "ws3", "idle"])?;
    d.on("ws1", PROJECT)?;
    let t = Instant::now();
    d.on(
        "ws1",
        "cd /wisp/demo/proj && make -s -j2 >/dev/null && make -s clean",
    )?;
    let local = t.elapsed();
    println!("  local make -j2 on ws1: {:.1} s", local.as_secs_f64());
    std::thread::sleep(Duration::from_secs(2));
    let mut make = d.c.command(
        "ws1",
        &[
            "sh",
            "-c",
            "cd /wisp/demo/proj && make -s -j6 SHELL=rexec && ./app",
        ],
    )?;
    make.stdout(Stdio::piped()).stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = make.spawn()?;
    let mut seen: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    while child.try_wait()?.is_none() {
        let jobs = d.jobs();
        let mut per: std::collections::BTreeMap<String, usize> = Default::default();
        for (j, h) in &jobs {
            *per.entry(h.clone()).or_default() += 1;
            seen.entry(h.clone()).or_default().insert(j.clone());
        }
        let view: Vec<String> = ["ws1", "ws2", "ws3"]
            .iter()
            .map(|h| format!("{h}: {:<2}", per.get(*h).copied().unwrap_or(0)))
            .collect();
        print!(
            "\r  jobs running   {}   t={:.1}s ",
            view.join("  "),
            t.elapsed().as_secs_f64()
        );
        std::io::stdout().flush().ok();
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = child.wait_with_output()?;
    println!();
    if !out.status.success() {
        bail!(
            "the rexec build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let remote = t.elapsed();
    print!("  {}", String::from_utf8_lossy(&out.stdout));
    let spread: Vec<String> = seen
        .iter()
        .map(|(h, js)| format!("{h} ran {}", js.len()))
        .collect();
    println!(
        "  rexec build: {:.1} s; {}",
        remote.as_secs_f64(),
        spread.join(", ")
    );
    d.report.push((
        "build, local make -j2".into(),
        format!("{:.1} s", local.as_secs_f64()),
    ));
    d.report.push((
        "build, make -j6 SHELL=rexec".into(),
        format!("{:.1} s ({})", remote.as_secs_f64(), spread.join(", ")),
    ));
    println!(
        "  (every host here shares this machine's cores: the demo shows jobs moving, not speed-up)"
    );

    d.say("migration: a running job moves between hosts while its output streams");
    let mut ticker = d.c.command("ws1", &["sh", "-c", TICKER])?;
    ticker.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut tk = ticker.spawn()?;
    let out = tk.stdout.take().expect("piped");
    let err = tk.stderr.take().expect("piped");
    let pump = std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            println!("  | {l}");
        }
    });
    let pump_err = std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            println!("  ! {l}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let (job, from) = loop {
        if let Some(j) = d.jobs().into_iter().next() {
            break j;
        }
        if Instant::now() > deadline {
            bail!("the long-running job did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(2));
    let to = if from == "ws2" { "ws3" } else { "ws2" };
    let m = d.cli(&["migrate", &job, "--to", to])?;
    println!("  >>> {}", m.trim());
    d.report.push((
        format!("migrate job {job} {from} -> {to}"),
        m.split(": ").nth(1).unwrap_or("").trim().to_string(),
    ));
    std::thread::sleep(Duration::from_secs(2));

    d.say(&format!(
        "eviction: the owner of {to} comes back; the job leaves at once"
    ));
    let t = Instant::now();
    d.cli(&["owner", to, "active"])?;
    let mut evicted_to = String::new();
    while t.elapsed() < Duration::from_secs(10) {
        if let Some((_, h)) = d.jobs().into_iter().find(|(j, _)| *j == job) {
            if h != to {
                evicted_to = h;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if evicted_to.is_empty() {
        bail!("job {job} was not evicted from {to}");
    }
    let ev = t.elapsed();
    println!("  >>> job {job} evicted from {to} to {evicted_to} in {:.0} ms (owner touch to job running elsewhere)", ev.as_secs_f64() * 1e3);
    d.report.push((
        format!("evict job {job} from {to} -> {evicted_to}"),
        format!("{:.0} ms", ev.as_secs_f64() * 1e3),
    ));
    let st = tk.wait()?;
    pump.join().ok();
    pump_err.join().ok();
    d.report.push((
        "long-running job exit status".into(),
        format!("{}", st.code().unwrap_or(-1)),
    ));

    println!("\n\x1b[1mreport\x1b[0m");
    for (k, v) in &d.report {
        println!("  {k:<40} {v}");
    }
    println!(
        "  {:<40} {:.1} s",
        "whole demo",
        d.t0.elapsed().as_secs_f64()
    );
    println!("\ntearing the cluster down");
    Ok(())
}
