// bbc/sqs-consumer (pinned in package.json) set up as its README shows: Consumer.create with
// queueUrl, handleMessage and an SQSClient; batchSize 10 so a batch is processed in parallel.
// handleMessage calls the three targets concurrently with Node's fetch and returns the
// message, which acknowledges (deletes) it. It decrypts nothing: it forwards the body.
//
// Configuration comes from the environment: QUEUE_URL, SQS_ENDPOINT, AWS_REGION and TARGETS
// (JSON [[name, url], ...]). Prints "ready" when started; stops on SIGTERM.
import { Consumer } from "sqs-consumer";
import { SQSClient } from "@aws-sdk/client-sqs";

const targets = JSON.parse(process.env.TARGETS);

const app = Consumer.create({
  queueUrl: process.env.QUEUE_URL,
  batchSize: 10,
  messageAttributeNames: ["All"],
  sqs: new SQSClient({
    region: process.env.AWS_REGION ?? "us-east-1",
    endpoint: process.env.SQS_ENDPOINT,
    credentials: { accessKeyId: "bench", secretAccessKey: "bench" },
  }),
  handleMessage: async (message) => {
    const requestId = message.MessageAttributes?.request_id?.StringValue ?? message.MessageId;
    await Promise.all(
      targets.map(async ([name, url]) => {
        const response = await fetch(url, {
          method: "POST",
          body: message.Body,
          headers: { "Content-Type": "application/json", "Idempotency-Key": `${requestId}:${name}` },
          signal: AbortSignal.timeout(5000),
        });
        await response.arrayBuffer();
        if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
      }),
    );
    return message;
  },
});

app.on("error", (err) => console.error(err.message));
app.on("processing_error", (err) => console.error(err.message));
app.on("timeout_error", (err) => console.error(err.message));
app.on("started", () => console.log("ready"));
process.on("SIGTERM", () => {
  app.stop({ abort: true });
  setTimeout(() => process.exit(0), 50);
});
app.start();
