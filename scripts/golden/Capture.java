// Runs Debezium's embedded engine (the real PostgreSQL connector and JsonConverter, no Kafka) with
// the properties file given as the first argument, and appends every record to the file given as
// the second, one JSON line each: {"topic": …, "key": "<the key bytes>", "value": "<the value
// bytes>"} (null for a tombstone's value), the bytes exactly as JsonConverter wrote them. It stops
// once a logical message with the prefix `golden-end` arrives: scripts/capture_golden.py emits it
// after its last statement, so every change before it has been captured.
import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.JsonByteArray;

import java.io.FileInputStream;
import java.io.FileOutputStream;
import java.io.OutputStreamWriter;
import java.io.Writer;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

public class Capture {
    static String quote(byte[] b) {
        if (b == null) return "null";
        String s = new String(b, StandardCharsets.UTF_8);
        StringBuilder o = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': o.append("\\\""); break;
                case '\\': o.append("\\\\"); break;
                case '\n': o.append("\\n"); break;
                case '\r': o.append("\\r"); break;
                case '\t': o.append("\\t"); break;
                default:
                    if (c < 0x20) o.append(String.format("\\u%04x", (int) c));
                    else o.append(c);
            }
        }
        return o.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (FileInputStream in = new FileInputStream(args[0])) {
            props.load(in);
        }
        CountDownLatch end = new CountDownLatch(1);
        Writer out = new OutputStreamWriter(new FileOutputStream(args[1], true), StandardCharsets.UTF_8);
        DebeziumEngine<ChangeEvent<byte[], byte[]>> engine = DebeziumEngine.create(JsonByteArray.class)
            .using(props)
            .notifying(r -> {
                try {
                    out.write("{\"topic\":" + quote(r.destination().getBytes(StandardCharsets.UTF_8))
                        + ",\"key\":" + quote(r.key()) + ",\"value\":" + quote(r.value()) + "}\n");
                    out.flush();
                } catch (Exception e) {
                    throw new RuntimeException(e);
                }
                if (r.value() != null && r.destination().endsWith(".message")
                        && new String(r.value(), StandardCharsets.UTF_8).contains("\"prefix\":\"golden-end\"")) {
                    end.countDown();
                }
            })
            .using((success, message, error) -> {
                if (!success) {
                    System.err.println("engine stopped: " + message);
                    if (error != null) error.printStackTrace();
                }
                end.countDown();
            })
            .build();
        ExecutorService ex = Executors.newSingleThreadExecutor();
        ex.execute(engine);
        boolean done = end.await(Long.parseLong(props.getProperty("capture.timeout.s", "120")), TimeUnit.SECONDS);
        engine.close();
        ex.shutdown();
        ex.awaitTermination(30, TimeUnit.SECONDS);
        out.close();
        if (!done) {
            System.err.println("no golden-end message within the timeout");
            System.exit(2);
        }
        System.exit(0);
    }
}
