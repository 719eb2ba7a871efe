package example;

import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;

import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * Submits one Nexus request and prints its answer, with Kafka's Java client and Avro only.
 *
 * <p>Usage: SubmitRequest BOOTSTRAP SCHEMA_DIR MODEL PROMPT
 */
public final class SubmitRequest {

  /** A schema file that refers to nexus.inference.ModelContext by name, parsed with it. */
  static Schema load(Path dir, String file) throws Exception {
    Schema.Parser parser = new Schema.Parser();
    parser.parse(Files.readString(dir.resolve("ModelContext.v1.avsc")));
    return parser.parse(Files.readString(dir.resolve(file)));
  }

  public static void main(String[] args) throws Exception {
    String bootstrap = args[0];
    Path schemas = Path.of(args[1]);
    String model = args[2];
    String prompt = args[3];

    // Write with the newest version of InferenceRequest; read responses of any known version.
    Schema request = load(schemas, "InferenceRequest.v3.avsc");
    Schema responseV3 = load(schemas, "InferenceResponse.v3.avsc");
    Schema responseV2 = load(schemas, "InferenceResponse.v2.avsc");
    Schema responseV1 = load(schemas, "InferenceResponse.v1.avsc");

    long fingerprint = SchemaNormalization.parsingFingerprint64(request);
    System.out.println("InferenceRequest v3 fingerprint (CRC-64-AVRO): "
        + HexFormat.of().formatHex(ByteBuffer.allocate(8).order(java.nio.ByteOrder.LITTLE_ENDIAN)
            .putLong(fingerprint).array()));

    String id = "java-" + UUID.randomUUID();
    GenericRecord context = new GenericData.Record(request.getField("context").schema());
    context.put("session_id", "java-session");
    context.put("metadata", Map.of("client", "java"));
    GenericRecord options = new GenericData.Record(request.getField("options").schema());
    GenericRecord value = new GenericData.Record(request);
    value.put("id", id);
    value.put("model_id", model);
    value.put("input", prompt);
    value.put("context", context);
    value.put("options", options);           // all fields null: the model's defaults
    value.put("stream", false);
    value.put("created_at", System.currentTimeMillis());
    value.put("cache", "default");
    // deadline, original_id, reply_to and key_name keep their default, null

    // Single-object encoding: C3 01, the 8-byte little-endian fingerprint, the Avro body.
    byte[] bytes = new BinaryMessageEncoder<GenericRecord>(GenericData.get(), request).encode(value).array();
    System.out.println("first 10 bytes (header): " + HexFormat.ofDelimiter(" ").formatHex(bytes, 0, 10));

    Properties common = new Properties();
    common.put("bootstrap.servers", bootstrap);

    // Start reading the responses from their end *before* producing, so the answer can't be missed.
    Properties consumerProps = (Properties) common.clone();
    consumerProps.put("key.deserializer", ByteArrayDeserializer.class.getName());
    consumerProps.put("value.deserializer", ByteArrayDeserializer.class.getName());
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(consumerProps)) {
      List<TopicPartition> partitions = consumer.partitionsFor("inference.responses").stream()
          .map(p -> new TopicPartition(p.topic(), p.partition())).toList();
      consumer.assign(partitions);   // no consumer group: assign, not subscribe
      consumer.seekToEnd(partitions);
      partitions.forEach(consumer::position);

      Properties producerProps = (Properties) common.clone();
      producerProps.put("acks", "all");
      producerProps.put("key.serializer", ByteArraySerializer.class.getName());
      producerProps.put("value.serializer", ByteArraySerializer.class.getName());
      try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(producerProps)) {
        RecordMetadata written = producer.send(new ProducerRecord<>(
            "inference.requests", model.getBytes(StandardCharsets.UTF_8), bytes)).get();
        System.out.printf("submitted %s to %s-%d at offset %d%n",
            id, written.topic(), written.partition(), written.offset());
      }

      BinaryMessageDecoder<GenericRecord> decoder =
          new BinaryMessageDecoder<>(GenericData.get(), responseV3);
      decoder.addSchema(responseV2);   // older writers are resolved to v3 by fingerprint
      decoder.addSchema(responseV1);
      long deadline = System.currentTimeMillis() + 60_000;
      while (System.currentTimeMillis() < deadline) {
        for (ConsumerRecord<byte[], byte[]> record : consumer.poll(Duration.ofMillis(500))) {
          GenericRecord response = decoder.decode(record.value());
          if (id.equals(response.get("id").toString())) {
            System.out.printf("answer (%s, %s ms): %s%n",
                response.get("status"), response.get("latency_ms"), response.get("output"));
            return;
          }
        }
      }
      System.err.println("no answer within 60 s: is a Nexus worker running?");
      System.exit(1);
    }
  }
}
