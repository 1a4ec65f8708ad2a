// The Flink job that paystream replaces, written the way Flink's documentation advises for this
// shape, so `scripts/bench --only flink` compares paystream with a fair Flink, not a strawman.
//
// Same work as `paystream replay`: read a file of Debezium JSON message values (one per line),
// key by payment id, keep each pending payment's row in keyed state (a POJO: id, idempotency key,
// exact amount as text, currency, intent id), register one processing-time timer per pending
// payment (the ten-minute poll), drop the row and its timer when the row turns final or is
// deleted. Checkpoints every 10 s (paystream's replay makes state durable every second).
//
// Tuning, from Flink's docs for a keyed, state-heavy pipeline on one core: parallelism 1 (one
// task slot, as paystream's one pipeline core), object reuse on, EmbeddedRocksDB with
// incremental checkpoints and its predefined options for local SSDs (or the HashMap backend,
// `hashmap`), one ObjectMapper per task, no per-record allocation beyond the parse.
//
// Usage: java ... PendingPayments <input.jsonl> <checkpoint-dir> <rocksdb|hashmap>
// Prints one JSON line: events, tracked, updated, resolved, ignored, pending.

import java.util.HashMap;
import java.util.Map;

import org.apache.flink.api.common.JobExecutionResult;
import org.apache.flink.api.common.accumulators.LongCounter;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.file.src.FileSource;
import org.apache.flink.connector.file.src.reader.TextLineInputFormat;
import org.apache.flink.core.fs.Path;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.util.Collector;

public class PendingPayments {
    static final long POLL_INTERVAL_MS = 600_000;

    /** The pending row kept per payment (a Flink POJO: public fields, no-arg constructor). */
    public static class Pending {
        public String id;
        public String idempotencyKey;
        /** Exact decimal text, never a float. */
        public String amount;
        public String currency;
        public String intentId;
        public long nextPollMs;

        public Pending() {}
    }

    /** One change: the payment id, the op, and the row after it (null for deletes). */
    public static class Change {
        public String id;
        public String op;
        public String status;
        public String idempotencyKey;
        public String amount;
        public String currency;
        public String intentId;

        public Change() {}
    }

    static String text(JsonNode n, String field) {
        JsonNode v = n.get(field);
        return v == null || v.isNull() ? null : v.asText();
    }

    /** Applies changes to the pending rows, as paystream's state does. */
    public static class Track extends KeyedProcessFunction<String, Change, Void> {
        private transient ValueState<Pending> row;
        private final LongCounter tracked = new LongCounter();
        private final LongCounter updated = new LongCounter();
        private final LongCounter resolved = new LongCounter();
        private final LongCounter ignored = new LongCounter();

        @Override
        public void open(OpenContext ctx) {
            row = getRuntimeContext().getState(new ValueStateDescriptor<>("row", Pending.class));
            getRuntimeContext().addAccumulator("tracked", tracked);
            getRuntimeContext().addAccumulator("updated", updated);
            getRuntimeContext().addAccumulator("resolved", resolved);
            getRuntimeContext().addAccumulator("ignored", ignored);
        }

        @Override
        public void processElement(Change c, Context ctx, Collector<Void> out) throws Exception {
            Pending p = row.value();
            boolean pending = ("c".equals(c.op) || "r".equals(c.op) || "u".equals(c.op))
                    && "pending".equals(c.status);
            if (pending) {
                if (p == null) {
                    p = new Pending();
                    p.id = c.id;
                    p.nextPollMs = ctx.timerService().currentProcessingTime() + POLL_INTERVAL_MS;
                    ctx.timerService().registerProcessingTimeTimer(p.nextPollMs);
                    tracked.add(1);
                } else {
                    updated.add(1);
                }
                p.idempotencyKey = c.idempotencyKey;
                p.amount = c.amount;
                p.currency = c.currency;
                p.intentId = c.intentId;
                row.update(p);
            } else if (p != null) {
                // A final status or a delete: nothing left to watch.
                ctx.timerService().deleteProcessingTimeTimer(p.nextPollMs);
                row.clear();
                resolved.add(1);
            } else {
                ignored.add(1);
            }
        }

        @Override
        public void onTimer(long at, OnTimerContext ctx, Collector<Void> out) throws Exception {
            // The poll would go here; the file ends long before ten minutes pass.
            Pending p = row.value();
            if (p != null) {
                p.nextPollMs = at + POLL_INTERVAL_MS;
                ctx.timerService().registerProcessingTimeTimer(p.nextPollMs);
                row.update(p);
            }
        }
    }

    public static void main(String[] args) throws Exception {
        String input = args[0], checkpoints = args[1], backend = args.length > 2 ? args[2] : "rocksdb";
        Map<String, String> c = new HashMap<>();
        c.put("state.backend.type", backend);
        c.put("execution.checkpointing.dir", "file://" + checkpoints);
        c.put("execution.checkpointing.interval", "10 s");
        c.put("execution.checkpointing.incremental", "true");
        c.put("state.backend.rocksdb.predefined-options", "FLASH_SSD_OPTIMIZED");
        c.put("pipeline.object-reuse", "true");
        c.put("parallelism.default", "1");
        StreamExecutionEnvironment env =
                StreamExecutionEnvironment.createLocalEnvironment(1, Configuration.fromMap(c));

        FileSource<String> source =
                FileSource.forRecordStreamFormat(new TextLineInputFormat(), new Path(input)).build();
        LongCounter[] events = {null};
        env.fromSource(source, WatermarkStrategy.noWatermarks(), "debezium-file")
                .flatMap(new org.apache.flink.api.common.functions.RichFlatMapFunction<String, Change>() {
                    private transient ObjectMapper json;
                    private final LongCounter lines = new LongCounter();

                    @Override
                    public void open(OpenContext ctx) {
                        json = new ObjectMapper();
                        getRuntimeContext().addAccumulator("events", lines);
                    }

                    @Override
                    public void flatMap(String line, Collector<Change> out) throws Exception {
                        lines.add(1);
                        String t = line.trim();
                        if (t.isEmpty() || t.equals("null")) {
                            return; // a tombstone: the delete before it removed the payment
                        }
                        JsonNode v = json.readTree(t);
                        JsonNode after = v.get("after");
                        JsonNode before = v.get("before");
                        JsonNode r = after != null && !after.isNull() ? after : before;
                        if (r == null || r.isNull()) {
                            return;
                        }
                        Change ch = new Change();
                        ch.id = text(r, "id");
                        ch.op = text(v, "op");
                        if (after != null && !after.isNull()) {
                            ch.status = text(after, "status");
                            ch.idempotencyKey = text(after, "idempotency_key");
                            ch.amount = text(after, "amount");
                            ch.currency = text(after, "currency");
                            ch.intentId = text(after, "stripe_payment_intent_id");
                        }
                        out.collect(ch);
                    }
                })
                .returns(Change.class)
                .keyBy((KeySelector<Change, String>) ch -> ch.id, Types.STRING)
                .process(new Track())
                .returns(Types.VOID)
                .sinkTo(new DiscardingSink<>());

        long started = System.nanoTime();
        JobExecutionResult res = env.execute("pending-payments");
        double wall = (System.nanoTime() - started) / 1e9;
        long tracked = res.<Long>getAccumulatorResult("tracked");
        long resolved = res.<Long>getAccumulatorResult("resolved");
        System.out.printf(
                "{\"events\":%d,\"tracked\":%d,\"updated\":%d,\"resolved\":%d,\"ignored\":%d,\"pending\":%d,\"job_wall_s\":%.3f}%n",
                res.<Long>getAccumulatorResult("events"), tracked,
                res.<Long>getAccumulatorResult("updated"), resolved,
                res.<Long>getAccumulatorResult("ignored"), tracked - resolved, wall);
    }
}
