//! Real processes for end-to-end tests and harnesses (nats-server, coordinators, workers):
//! each writes to its own log file and is stopped when its [`Process`] handle drops, so a
//! failing test or an interrupted harness leaves nothing running.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// A child process with its log file; stopped on drop.
pub struct Process {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
    /// On drop: SIGTERM and this long to exit before SIGKILL; zero means SIGKILL at once.
    drop_grace: Duration,
}

impl Process {
    /// Starts `command` with stdin closed and stdout and stderr going to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> Result<Process> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start {name}: {command:?}"))?;
        Ok(Process { name: name.to_owned(), log, child: Some(child), drop_grace: Duration::ZERO })
    }

    /// Stops the process gracefully on drop (SIGTERM, then SIGKILL after `grace`).
    pub fn with_drop_grace(mut self, grace: Duration) -> Process {
        self.drop_grace = grace;
        self
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL, then reap.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then up to `grace` to exit before SIGKILL. True when it exited by itself
    /// with status 0 within `grace`.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// True once the process has exited (or was stopped).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The last `lines` lines of the process's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.drop_grace.is_zero() {
            self.kill_hard();
        } else {
            self.stop(self.drop_grace);
        }
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// How long a metrics scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /metrics` from the Prometheus endpoint at `addr` (host:port); the body.
pub fn scrape_metrics(addr: &str) -> Result<String> {
    let (status, body) = http_get(addr, "/metrics")?;
    ensure!(status == 200, "GET /metrics from {addr} answered {status}: {body}");
    Ok(body)
}

/// `GET path` from the HTTP server at `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let (status, _, body) = http_exchange(addr, "GET", path, &[], None)?;
    Ok((status, body))
}

/// A form (`application/x-www-form-urlencoded` `body`) posted to `path`: the status code,
/// the `Location` header if any, and the body.
pub fn http_post_form(addr: &str, path: &str, body: &str) -> Result<(u16, Option<String>, String)> {
    let (status, headers, body) =
        http_exchange(addr, "POST", path, &[("Content-Type", "application/x-www-form-urlencoded")], Some(body))?;
    Ok((status, header(&headers, "location").map(str::to_owned), body))
}

/// JSON `body` posted to `path`, with `Authorization: Bearer <token>` if given: the status
/// code and the body.
pub fn http_post_json(addr: &str, path: &str, body: &str, token: Option<&str>) -> Result<(u16, String)> {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(bearer.as_deref().map(|bearer| ("Authorization", bearer)));
    let (status, _, body) = http_exchange(addr, "POST", path, &headers, Some(body))?;
    Ok((status, body))
}

/// An HTTP answer's headers, as (name, value) in the order they came.
pub type Headers = Vec<(String, String)>;

/// The value of the first header `name` (any case) of an answer of [`http_exchange`].
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(found, _)| found.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
}

/// One HTTP/1.0 request with `headers` and `body` (the server closes the connection after
/// its answer): the status code, the answer's headers and its body.
pub fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<(u16, Headers, String)> {
    let mut stream = std::net::TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        request.push_str("\r\n");
    }
    if let Err(error) = stream.write_all(request.as_bytes()) {
        // A server that refuses a body past its bound answers before it has read it all, and
        // closes: its answer is there to read all the same.
        if !matches!(error.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) {
            return Err(error.into());
        }
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).with_context(|| format!("read {method} {path} from {addr}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{method} {path} from {addr} answered {head}"))?;
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

/// The value of the first sample of a scraped `body` whose line starts with `prefix`
/// (`name{label="v"`, or `name ` for a sample without labels).
pub fn metric_value(body: &str, prefix: &str) -> Option<f64> {
    body.lines().filter(|line| line.starts_with(prefix)).find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// A Linux network namespace joined to the host by a veth pair, to cut the processes in it
/// off the network while they keep running ([`Netns::set_linked`] takes the host's end of
/// the pair down): their TCP connections stay open, since nothing resets them, as in a real
/// partition. Making one needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's `ip`.
/// The namespace and the pair are deleted on drop.
pub struct Netns {
    pub name: String,
    host_link: String,
    /// The host's address on the pair: how processes inside reach servers of the host that
    /// listen on it (or on `0.0.0.0`).
    pub host_address: String,
}

impl Netns {
    /// Makes the namespace and the pair, with `10.x.y.1` on the host and `10.x.y.2` inside
    /// (`x.y` from the process id and a counter, so that several may exist at once).
    pub fn create() -> Result<Netns> {
        static CREATED: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let count = CREATED.fetch_add(1, Ordering::Relaxed);
        let id = format!("{pid}x{count}");
        let key = pid.wrapping_mul(8).wrapping_add(count);
        let (a, b) = (100 + (key / 256) % 100, key % 256);
        ip(&["netns", "add", &format!("flowgrid-{id}")])?;
        let netns = Netns {
            name: format!("flowgrid-{id}"),
            host_link: format!("fgh{id}"),
            host_address: format!("10.{a}.{b}.1"),
        };
        let inner_link = format!("fgn{id}");
        ip(&["link", "add", &netns.host_link, "type", "veth", "peer", "name", &inner_link])?;
        ip(&["link", "set", &inner_link, "netns", &netns.name])?;
        ip(&["addr", "add", &format!("{}/30", netns.host_address), "dev", &netns.host_link])?;
        ip(&["link", "set", &netns.host_link, "up"])?;
        let inside = |args: &[&str]| ip(&[&["netns", "exec", &netns.name, "ip"], args].concat());
        inside(&["addr", "add", &format!("10.{a}.{b}.2/30"), "dev", &inner_link])?;
        inside(&["link", "set", &inner_link, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// `nats://<host address>:<port>`: a server of the host on `port`, seen from inside.
    pub fn nats_url(&self, port: &str) -> String {
        format!("nats://{}:{port}", self.host_address)
    }

    /// Cuts the namespace off (`false`) or joins it again (`true`).
    pub fn set_linked(&self, linked: bool) -> Result<()> {
        ip(&["link", "set", &self.host_link, if linked { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).output().with_context(|| format!("run ip {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// The nats-server settings of every grid this repository starts (`deploy/nats-server.conf`,
/// which `make up` and `make demo` pass as they are).
pub const NATS_SERVER_CONFIG: &str = include_str!("../../../deploy/nats-server.conf");

/// What the streams of a test or load-test grid may reserve, unless `more` sets its own
/// `jetstream` block. The grid's streams and buckets reserve over 2 GiB in all but write
/// little, while nats-server by default allows 75% of the disk space free when it starts:
/// on a shared disk that is nearly full that is too little, and streams would be refused.
const JETSTREAM_RESERVE: &str = "jetstream { max_file_store: 64GB }";

/// Writes [`NATS_SERVER_CONFIG`] and then `more` (more lines of configuration) to
/// `dir/nats-server.conf`, for `nats-server -c`; returns its path.
pub fn write_nats_config(dir: &Path, more: &str) -> Result<PathBuf> {
    let config = dir.join("nats-server.conf");
    let reserve = if more.contains("jetstream") { "" } else { JETSTREAM_RESERVE };
    std::fs::write(&config, format!("{NATS_SERVER_CONFIG}\n{reserve}\n{more}\n"))
        .with_context(|| format!("write {}", config.display()))?;
    Ok(config)
}

/// The nats-server binary: `NATS_SERVER_BIN` (set by `make setup`), else `nats-server` on PATH.
pub fn nats_server_bin() -> PathBuf {
    std::env::var("NATS_SERVER_BIN").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("nats-server"))
}

/// Waits until something listens on `port` of loopback; fails with the process's log when
/// it exits first or `deadline` passes.
pub fn wait_for_port(port: u16, process: &mut Process, deadline: Duration) -> Result<()> {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if process.has_exited() {
            bail!(
                "{} exited before listening on port {port}; its log ends with:\n{}",
                process.name,
                process.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "{} did not listen on port {port} within {deadline:?}; its log ends with:\n{}",
        process.name,
        process.log_tail(40)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_stopped_on_drop_and_its_log_is_kept() {
        let dir = std::env::temp_dir().join(format!("flowgrid-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let process = Process::spawn("sleeper", Command::new("sh").args(["-c", "echo ready; sleep 30"]), &dir).unwrap();
        let pid = process.pid();
        assert!(pid > 0);
        let started = Instant::now();
        while process.log_tail(1) != "ready" {
            assert!(started.elapsed() < Duration::from_secs(10), "the child never wrote its log");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(process);
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z");
        assert!(!alive, "the child outlived its handle");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
