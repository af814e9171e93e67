//! An in-process Kafka: librdkafka's mock cluster, speaking the real protocol on loopback.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::contracts::topics;

pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    pub fn start() -> rdkafka::error::KafkaResult<Self> {
        Ok(Self {
            cluster: MockCluster::new(1)?,
        })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// The mock cluster itself: broker down/up, injected request errors, topics.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }

    /// Every consumed, dead-letter and published topic, under `prefix`.
    pub fn create_topics(&self, prefix: &str, partitions: i32) -> rdkafka::error::KafkaResult<()> {
        for topic in topics::CONSUMED {
            self.cluster
                .create_topic(&format!("{prefix}{topic}"), partitions, 1)?;
            self.cluster
                .create_topic(&format!("{prefix}{topic}{}", topics::DLQ_SUFFIX), 1, 1)?;
        }
        for topic in topics::PUBLISHED {
            self.cluster
                .create_topic(&format!("{prefix}{topic}"), partitions, 1)?;
        }
        Ok(())
    }
}
