#!/usr/bin/env node
// A complete kafka-sidecar consumer in Node: it opens a stream for one subscription, acks
// every batch it receives, and exits after --max-records records or --idle seconds without a
// batch (or on SIGINT/SIGTERM), printing a JSON summary on stdout.
//
//   npm ci && node consumer.js --target unix:///var/run/kafka-sidecar/sidecar.sock --subscription orders
//
// The API's .proto is loaded at run time (@grpc/proto-loader), so there is no generated code.
// Nothing here knows about Kafka, AWS or offsets: the sidecar owns all of that and commits
// what was acked. Records not acked when the stream ends are redelivered: nothing is lost.
//
// With OUTPUT_TOPIC set it is a consume-transform-produce app: each batch's ack carries one
// output per record (`ack.outputs`: the record's key and value, plus a header
// x-source-offset) for the sidecar to write to that topic. The sidecar settles the records
// only once their outputs are written: at least once, or exactly once (one Kafka transaction
// with the commit of the consumed offsets) when the subscription has transactions enabled.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const { values: args } = parseArgs({
  options: {
    target: { type: 'string', default: '127.0.0.1:50051' },
    subscription: { type: 'string' },
    token: { type: 'string', default: process.env.KAFKA_SIDECAR_TOKEN || '' },
    'max-records': { type: 'string', default: '0' },
    idle: { type: 'string', default: '0' },
    'max-batches': { type: 'string', default: '0' },
    'proto-dir': { type: 'string', default: path.join(__dirname, '..', '..', 'proto') },
  },
});
if (!args.subscription) {
  console.error('usage: consumer.js --subscription NAME [--target ADDR] [--max-records N] [--idle SECONDS]');
  process.exit(2);
}

const definition = protoLoader.loadSync('kafkasidecar/v1/consumer.proto', {
  includeDirs: [args['proto-dir']],
  keepCase: true, // field names as in the .proto: batch_id, delivery_attempt, ...
  longs: String, // 64-bit numbers (offsets, batch ids) as exact strings
  enums: String,
  defaults: true,
  oneofs: true, // `kind` names the field set in a oneof
});
const { kafkasidecar } = grpc.loadPackageDefinition(definition);

// The "transform" of a consume-transform-produce app: here one output per record, with its
// key and value (undefined stays absent: a null key, a tombstone) and a header naming the
// record it came from. They go in the batch's ack, so they belong to the records it settles.
function outputsFor(records, topic) {
  return records.map((record) => ({
    topic,
    key: record.key,
    value: record.value,
    headers: [{ key: 'x-source-offset', value: Buffer.from(String(record.offset)) }],
  }));
}

function consume() {
  const maxRecords = Number(args['max-records']);
  const idleMs = Number(args.idle) * 1000;
  const outputTopic = process.env.OUTPUT_TOPIC || '';
  const summary = {
    records: 0, batches: 0, redelivered: 0, rejected: 0, outputs: 0, transactional: false,
    last_offsets: {}, stream_id: '', reason: '',
  };
  const client = new kafkasidecar.v1.ConsumerService(args.target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set('authorization', `Bearer ${args.token}`);
  const call = client.Consume(metadata);

  return new Promise((resolve, reject) => {
    let idleTimer = null;
    let stopping = false;
    const resetIdle = () => {
      if (idleMs > 0) {
        clearTimeout(idleTimer);
        idleTimer = setTimeout(() => stop('idle'), idleMs);
      }
    };
    // Drain, then half-close: the sidecar ends the stream and takes back whatever was not
    // acked (nothing, here) for redelivery. 'end' or 'error' below then settles the promise.
    const stop = (reason) => {
      if (stopping) return;
      stopping = true;
      summary.reason = reason;
      clearTimeout(idleTimer);
      call.write({ drain: {} });
      call.end();
      setTimeout(() => call.cancel(), 10000).unref();
    };
    process.once('SIGINT', () => stop('signal'));
    process.once('SIGTERM', () => stop('signal'));

    call.on('data', (response) => {
      switch (response.kind) {
        case 'opened':
          summary.stream_id = response.opened.stream_id;
          summary.transactional = response.opened.transactional;
          console.error(`opened ${response.opened.subscription}: group ${response.opened.group_id}`);
          break;
        case 'batch': {
          if (stopping) break; // sent before our drain: left unsettled, redelivered
          const { batch_id: batchId, records } = response.batch;
          for (const record of records) {
            // Process the record here (record.value is a Buffer, or null for a tombstone).
            // A crash before the ack below means the sidecar redelivers: at-least-once.
            summary.last_offsets[`${record.topic}[${record.partition}]`] = Number(record.offset);
            if (record.delivery_attempt > 1) summary.redelivered += 1;
          }
          const ack = { batch_ids: [batchId] };
          if (outputTopic) ack.outputs = outputsFor(records, outputTopic);
          call.write({ ack });
          summary.outputs += ack.outputs ? ack.outputs.length : 0;
          summary.records += records.length;
          summary.batches += 1;
          resetIdle();
          if (maxRecords > 0 && summary.records >= maxRecords) stop('max-records');
          break;
        }
        case 'partitions_assigned':
        case 'partitions_revoked':
          console.error(response.kind, response[response.kind].partitions.map((p) => `${p.topic}[${p.partition}]`).join(', '));
          break;
        case 'rejected':
          summary.rejected += 1;
          console.error(`rejected (${response.rejected.reason}): ${response.rejected.message}`);
          break;
        case 'draining':
          console.error(`sidecar shutting down: ${response.draining.deadline_ms} ms to settle`);
          break;
        default:
          break;
      }
    });
    let failed = false;
    call.on('error', (error) => {
      failed = true;
      clearTimeout(idleTimer);
      client.close();
      reject(Object.assign(error, { summary }));
    });
    call.on('end', () => {
      if (failed) return;
      clearTimeout(idleTimer);
      client.close();
      if (!summary.reason) summary.reason = 'stream ended';
      resolve(summary);
    });

    call.write({
      open: {
        subscription: args.subscription,
        client_id: `node-example-${process.pid}`,
        max_outstanding_batches: Number(args['max-batches']),
      },
    });
    resetIdle();
  });
}

consume().then(
  (summary) => {
    console.log(JSON.stringify(summary));
  },
  (error) => {
    console.log(JSON.stringify(error.summary || {}));
    console.error(`consumer: ${error.code !== undefined ? grpc.status[error.code] + ': ' : ''}${error.details || error.message}`);
    process.exit(1);
  },
);
