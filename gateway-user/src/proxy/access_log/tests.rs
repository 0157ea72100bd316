use std::time::UNIX_EPOCH;

use super::*;

/// A plain access log to the file `path`, with the metrics it counts in.
fn plain_to(path: &Path) -> (AccessLogger, GatewayMetrics) {
    let metrics = GatewayMetrics::new(
        &mut prometheus_client::registry::Registry::default(),
        crate::metrics::LatencyBuckets::reaching(Duration::ZERO),
    );
    let output = LogOutput::File(path.to_owned());
    let log = AccessLogger::start(
        &AccessLog {
            format: AccessLogFormat::Plain,
            output,
        },
        &metrics,
    )
    .unwrap();
    (log, metrics)
}

#[test]
fn reopen_moves_the_log_to_a_new_file_at_its_path() {
    let dir = std::env::temp_dir().join(format!("gateway-reopen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let (log, _metrics) = plain_to(&path);
    let line = |p: &str| {
        Record::new(
            "127.0.0.1:5000".parse().unwrap(),
            Method::GET,
            Uri::try_from(p).unwrap(),
            Version::HTTP_11,
        )
    };
    let wait_for = |file: &Path, needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{needle} not in {}: {text:?}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    log.log(&line("/before"));
    wait_for(&path, "/before");
    let rotated = dir.join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    log.reopen();
    // Recreated at once, before any new line (as nginx does).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "not recreated");
        std::thread::sleep(Duration::from_millis(10));
    }
    log.log(&line("/after"));
    let new = wait_for(&path, "/after");
    assert!(!new.contains("/before"), "{new}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("/before") && !old.contains("/after"), "{old}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A full disk (`/dev/full` refuses every write with ENOSPC): every line is counted as lost,
/// none is kept in memory, and the writer goes on (a later line is counted too).
#[test]
fn lines_a_full_disk_refuses_are_counted_as_lost() {
    let (log, metrics) = plain_to(Path::new("/dev/full"));
    let lost = metrics.access_log_lost.get_or_create(&ReasonLabels {
        reason: "write_error",
    });
    let record = Record::new(
        "127.0.0.1:5000".parse().unwrap(),
        Method::GET,
        Uri::from_static("/x"),
        Version::HTTP_11,
    );
    let wait_for = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lost.get() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} lines counted as lost",
                lost.get()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    for _ in 0..3 {
        log.log(&record);
    }
    wait_for(3);
    log.log(&record);
    wait_for(4);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lost.get(), 4, "each line once");
}

#[test]
fn rfc3339_formats_known_instants() {
    let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123);
    assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
    assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
}

#[test]
fn plain_line_names_route_cluster_endpoints_and_reason() {
    let mut ex = Record::new(
        "127.0.0.1:5000".parse().unwrap(),
        Method::GET,
        Uri::from_static("/api/x?y=1"),
        Version::HTTP_11,
    );
    ex.route = Some("api".into());
    ex.cluster = Some("backend".into());
    ex.attempts.push(Attempt {
        endpoint: "127.0.0.1:9001".parse().unwrap(),
        cookie: Some(7),
        reused: false,
        error: Some(ErrorKind::ConnectRefused),
        status: None,
    });
    ex.attempts.push(Attempt {
        endpoint: "127.0.0.1:9003".parse().unwrap(),
        cookie: Some(9),
        reused: true,
        error: None,
        status: Some(503),
    });
    ex.attempts.push(Attempt {
        endpoint: "127.0.0.1:9002".parse().unwrap(),
        cookie: Some(8),
        reused: true,
        error: None,
        status: None,
    });
    ex.retries = 2;
    ex.status = 200;
    let line = render(&ex, AccessLogFormat::Plain);
    assert!(line.contains("\"GET /api/x?y=1 HTTP/1.1\" 200 0 route=api cluster=backend endpoints=127.0.0.1:9001,127.0.0.1:9003,127.0.0.1:9002 attempt_errors=connect_refused,http_503,- cookies=7,9,8 attempts=3 retries=2 connect_ms=- first_byte_ms=- total_ms="), "{line}");
    assert!(
        line.contains(
            " error=- request_id=- host=- user_agent=\"-\" upstream_status=- request_bytes=0 tls=-"
        ),
        "{line}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&render(&ex, AccessLogFormat::Json)).unwrap();
    assert_eq!(json["endpoints"][2], "127.0.0.1:9002");
    assert_eq!(
        json["attempt_errors"],
        serde_json::json!(["connect_refused", "http_503", "-"])
    );
    assert_eq!(json["retries"], 2);
    assert_eq!(json["error"], serde_json::Value::Null);
}

/// An output that keeps each write it is given, as it was cut.
#[derive(Clone, Default)]
struct Writes(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Write for Writes {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// To stdout or stderr, every write is whole lines of at most `PIPE_BUF` bytes, which a pipe
/// takes at once: a write of 64 KiB was taken in parts when the pipe was nearly full, and the
/// log's writer on the same stderr cut a line in two (CI saw 999 of 1,000 lines whole).
#[test]
fn to_a_stream_each_write_is_whole_lines_that_a_pipe_takes_at_once() {
    let writes = Writes::default();
    let mut out = Output::new(Box::new(writes.clone()), false, Counter::default());
    let line = |i: usize| format!("{i:>5} {}", "x".repeat(250 + i % 97));
    for i in 0..1_000 {
        out.line(line(i).as_bytes(), true);
    }
    out.flush();
    let writes = writes.0.lock().unwrap();
    for w in writes.iter() {
        assert!(w.len() <= PIPE_BUF, "a write of {} bytes", w.len());
        assert_eq!(w.last(), Some(&b'\n'), "a write that ends inside a line");
    }
    let text = String::from_utf8(writes.concat()).unwrap();
    let want: Vec<String> = (0..1_000).map(line).collect();
    assert_eq!(text.lines().collect::<Vec<_>>(), want);
}

/// `flush` returns once every line logged before it is written: the lines of the requests that
/// ended during a drain, which the process would otherwise exit with. The output takes 5 ms
/// over each write, so most lines are still queued when `flush` is called.
#[test]
fn flush_waits_until_every_line_logged_is_written() {
    #[derive(Clone, Default)]
    struct Slow(Writes);
    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(5));
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let out = Slow::default();
    let log = AccessLogger::writing_to(
        (Box::new(out.clone()), None),
        AccessLogFormat::Plain,
        (Counter::default(), Counter::default()),
    )
    .unwrap();
    let record = Record::new(
        "127.0.0.1:5000".parse().unwrap(),
        Method::GET,
        Uri::from_static("/x"),
        Version::HTTP_11,
    );
    const LINES: usize = 500;
    for _ in 0..LINES {
        log.log(&record);
    }
    log.flush(Duration::from_secs(10));
    let written = out.0.0.lock().unwrap().concat();
    assert_eq!(String::from_utf8(written).unwrap().lines().count(), LINES);
}

/// A line longer than the buffer is one write with its newline: `BufWriter` wrote it straight
/// out and kept the newline for a later write, between which another writer's line could
/// come.
#[test]
fn a_line_longer_than_the_buffer_is_one_write_with_its_newline() {
    let writes = Writes::default();
    let mut out = Output::new(Box::new(writes.clone()), false, Counter::default());
    let long = "y".repeat(2 * PIPE_BUF);
    out.line(b"short", true);
    out.line(long.as_bytes(), true);
    out.flush();
    let writes = writes.0.lock().unwrap();
    assert_eq!(
        *writes,
        [b"short\n".to_vec(), format!("{long}\n").into_bytes()]
    );
}
