//! The broker: topics, producing, reading back, committed offsets.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::*;

pub const KAFKA_TEST_OPTIONS: &str = "session.timeout.ms=6000;heartbeat.interval.ms=1000";

pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
        .collect();
    let res = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in res {
        r.expect("topic created");
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

pub async fn publish(p: &FutureProducer, topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) {
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
    if let Some(k) = key {
        rec = rec.key(k);
    }
    if let Some(v) = value {
        rec = rec.payload(v);
    }
    p.send(rec, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("publish");
}

/// (key, value, headers) of one record.
pub type Record = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>);

/// The partition ids of `topic`, from the broker's metadata.
fn partitions(c: &BaseConsumer, topic: &str) -> Vec<i32> {
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0].partitions().iter().map(|p| p.id()).collect()
}

/// Every record of a topic (all partitions) from the beginning up to the high watermark:
/// (key, value, headers).
pub fn read_all(brokers: &str, topic: &str) -> Vec<Record> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let parts = partitions(&c, topic);
    let mut out = Vec::new();
    for p in parts {
        let (_, high) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        if high == 0 {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        drop(tpl);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut next = 0;
        while next < high && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                next = m.offset() + 1;
                let headers = m
                    .headers()
                    .map(|h| {
                        use rdkafka::message::Headers;
                        h.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    String::from_utf8_lossy(x.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
        }
    }
    out
}

/// High watermark of every partition of `topic`, by partition.
pub fn high_watermarks(brokers: &str, topic: &str) -> Vec<(i32, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .create()
        .unwrap();
    let parts = partitions(&c, topic);
    parts
        .into_iter()
        .map(|p| {
            (
                p,
                c.fetch_watermarks(topic, p, Duration::from_secs(10))
                    .unwrap()
                    .1,
            )
        })
        .collect()
}

/// The sum of a group's committed offsets over partitions `0..partitions` of `topic`.
/// Blocking (librdkafka): call it from `spawn_blocking` in async tests.
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("broker.address.family", "v4")
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let sum = got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    // librdkafka's list must go before its consumer (see the broker notes on hangs).
    drop(got);
    sum
}

/// Waits until a group's committed offsets on `topic` sum to `want`.
pub async fn wait_committed(
    s: &Stack,
    group: &str,
    topic: &str,
    partitions: i32,
    want: i64,
    what: &str,
    secs: u64,
) {
    wait_for(what, secs, || {
        let (b, g, t) = (s.brokers.clone(), group.to_string(), topic.to_string());
        async move {
            tokio::task::spawn_blocking(move || committed(&b, &g, &t, partitions))
                .await
                .unwrap()
                == want
        }
    })
    .await;
}
