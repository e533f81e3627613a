//! Reading a Prometheus endpoint the way a scraper does.

use std::io::{Read, Write};

/// The body of `GET /metrics` from the endpoint at `addr`, after checking that the answer
/// is `200 OK` in the text exposition format.
pub fn scrape(addr: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The metrics address a process logged in its text log (`metrics endpoint addr=...`).
pub fn logged_addr(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("metrics endpoint"))
        .find_map(|l| l.split_whitespace().find_map(|t| t.strip_prefix("addr=")))
        .map(|a| a.trim_end_matches(|c: char| !c.is_ascii_digit()).to_owned())
        .unwrap_or_else(|| panic!("no metrics endpoint in:\n{log}"))
}

/// A scrape's samples, parsed: each `name{labels} value` line.
pub struct Metrics(Vec<(String, f64)>);

impl Metrics {
    /// Parses the text exposition format (comment lines skipped).
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(|l| {
                    let (series, value) = l.rsplit_once(' ').expect("name value");
                    (series.to_owned(), value.parse().expect("a number"))
                })
                .collect(),
        )
    }

    /// The value of `series` (its name and labels exactly as exported), if exported.
    pub fn try_get(&self, series: &str) -> Option<f64> {
        self.0.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
    }

    /// The value of `series`, which must be exported.
    pub fn get(&self, series: &str) -> f64 {
        self.try_get(series)
            .unwrap_or_else(|| panic!("no series {series}"))
    }
}
