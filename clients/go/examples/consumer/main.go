// Command consumer is a complete kafka-sidecar consumer in Go: it opens a stream for one
// subscription, acks every batch it receives, and exits after -max-records records or
// -idle without a batch (or on SIGINT/SIGTERM), printing a JSON summary on stdout.
//
//	go run ./examples/consumer -target unix:///var/run/kafka-sidecar/sidecar.sock -subscription orders
//
// Nothing here knows about Kafka, AWS or offsets: the sidecar owns all of that and commits
// what was acked. Records not acked when the stream ends are redelivered, so a crash
// anywhere in this program loses nothing.
//
// With OUTPUT_TOPIC set it is a consume-transform-produce app: each batch's ack carries one
// output per record (Ack.Outputs: the record's key and value, plus a header x-source-offset)
// for the sidecar to write to that topic. The sidecar settles the records only once their
// outputs are written: at least once, or exactly once (one Kafka transaction with the commit
// of the consumed offsets) when the subscription has transactions enabled.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	pb "github.com/kafka-sidecar/kafka-sidecar/clients/go/kafkasidecar/v1"
)

type summary struct {
	Records       int              `json:"records"`
	Batches       int              `json:"batches"`
	Redelivered   int              `json:"redelivered"`
	Rejected      int              `json:"rejected"`
	Outputs       int              `json:"outputs"`
	Transactional bool             `json:"transactional"`
	LastOffsets   map[string]int64 `json:"last_offsets"`
	StreamID      string           `json:"stream_id"`
	Reason        string           `json:"reason"`
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "sidecar address: host:port or unix:///path")
	subscription := flag.String("subscription", "", "a subscription name from the sidecar config (required)")
	token := flag.String("token", os.Getenv("KAFKA_SIDECAR_TOKEN"), "bearer token, if the sidecar requires one")
	maxRecords := flag.Int("max-records", 0, "exit after acking this many records (0: no limit)")
	idle := flag.Duration("idle", 0, "exit after this long without a batch (0: never)")
	window := flag.Uint("max-batches", 0, "flow-control window in batches (0: the subscription's default)")
	flag.Parse()
	if *subscription == "" {
		flag.Usage()
		os.Exit(2)
	}
	log.SetOutput(os.Stderr)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	sum, err := consume(ctx, *target, *subscription, *token, os.Getenv("OUTPUT_TOPIC"),
		*maxRecords, *idle, uint32(*window))
	out, _ := json.Marshal(sum)
	fmt.Println(string(out))
	if err != nil {
		log.Fatalf("consumer: %v", err)
	}
}

// consume runs one stream to its end. A non-empty outputTopic makes every ack carry one
// output per record of its batch, for the sidecar to write to that topic.
func consume(ctx context.Context, target, subscription, token, outputTopic string,
	maxRecords int, idle time.Duration, window uint32) (*summary, error) {
	sum := &summary{LastOffsets: map[string]int64{}}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return sum, err
	}
	defer conn.Close()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	// The stream's own context: cancelled only if the sidecar does not end it after CloseSend.
	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := pb.NewConsumerServiceClient(conn).Consume(streamCtx)
	if err != nil {
		return sum, err
	}
	err = stream.Send(&pb.ConsumeRequest{Kind: &pb.ConsumeRequest_Open{Open: &pb.Open{
		Subscription:          subscription,
		ClientId:              fmt.Sprintf("go-example-%d", os.Getpid()),
		MaxOutstandingBatches: window,
	}}})
	if err != nil {
		return sum, err
	}

	// One goroutine receives; this one sends. gRPC allows exactly that pairing.
	responses := make(chan *pb.ConsumeResponse)
	ended := make(chan error, 1)
	go func() {
		for {
			response, err := stream.Recv()
			if err != nil {
				ended <- err
				return
			}
			responses <- response
		}
	}()

	var idleC <-chan time.Time
	resetIdle := func() {
		if idle > 0 {
			idleC = time.After(idle)
		}
	}
	resetIdle()
loop:
	for {
		select {
		case response := <-responses:
			switch kind := response.Kind.(type) {
			case *pb.ConsumeResponse_Opened:
				sum.StreamID = kind.Opened.StreamId
				sum.Transactional = kind.Opened.Transactional
				log.Printf("opened %q: group %s, stream %s", kind.Opened.Subscription,
					kind.Opened.GroupId, kind.Opened.StreamId)
			case *pb.ConsumeResponse_Batch:
				for _, record := range kind.Batch.Records {
					// Process the record here. A crash before the ack below means the sidecar
					// redelivers the batch: at-least-once.
					sum.LastOffsets[fmt.Sprintf("%s[%d]", record.Topic, record.Partition)] = record.Offset
					if record.DeliveryAttempt > 1 {
						sum.Redelivered++
					}
				}
				ack := &pb.Ack{BatchIds: []uint64{kind.Batch.BatchId}}
				if outputTopic != "" {
					ack.Outputs = outputsFor(kind.Batch.Records, outputTopic)
				}
				err := stream.Send(&pb.ConsumeRequest{Kind: &pb.ConsumeRequest_Ack{Ack: ack}})
				if err != nil {
					return sum, fmt.Errorf("ack: %w", err)
				}
				sum.Outputs += len(ack.Outputs)
				sum.Records += len(kind.Batch.Records)
				sum.Batches++
				resetIdle()
				if maxRecords > 0 && sum.Records >= maxRecords {
					sum.Reason = "max-records"
					break loop
				}
			case *pb.ConsumeResponse_PartitionsAssigned:
				log.Printf("assigned %v", kind.PartitionsAssigned.Partitions)
			case *pb.ConsumeResponse_PartitionsRevoked:
				log.Printf("revoked %v", kind.PartitionsRevoked.Partitions)
			case *pb.ConsumeResponse_Rejected:
				sum.Rejected++
				log.Printf("rejected (%s): %s", kind.Rejected.Reason, kind.Rejected.Message)
			case *pb.ConsumeResponse_Draining:
				log.Printf("sidecar shutting down: %d ms to settle", kind.Draining.DeadlineMs)
			}
		case err := <-ended:
			if errors.Is(err, io.EOF) {
				sum.Reason = "stream ended"
				return sum, nil
			}
			return sum, err
		case <-idleC:
			sum.Reason = "idle"
			break loop
		case <-ctx.Done():
			sum.Reason = "signal"
			break loop
		}
	}

	// Drain: no more batches, then half-close. The sidecar ends the stream and takes back
	// whatever this program did not ack (nothing, here), for redelivery.
	_ = stream.Send(&pb.ConsumeRequest{Kind: &pb.ConsumeRequest_Drain{Drain: &pb.Drain{}}})
	if err := stream.CloseSend(); err != nil {
		return sum, err
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case <-responses: // batches sent before the drain arrived: left unsettled
		case err := <-ended:
			if errors.Is(err, io.EOF) {
				return sum, nil
			}
			return sum, err
		case <-timeout:
			return sum, errors.New("the sidecar did not end the stream after CloseSend")
		}
	}
}

// outputsFor is the "transform" of a consume-transform-produce app: here one output per
// record, with its key and value (nil stays nil: a null key, a tombstone) and a header naming
// the record it came from. The outputs go in the batch's ack, so they belong to the records
// that ack settles.
func outputsFor(records []*pb.Record, topic string) []*pb.OutputRecord {
	outputs := make([]*pb.OutputRecord, 0, len(records))
	for _, record := range records {
		outputs = append(outputs, &pb.OutputRecord{
			Topic: topic,
			Key:   record.Key,
			Value: record.Value,
			Headers: []*pb.Header{{
				Key:   "x-source-offset",
				Value: []byte(strconv.FormatInt(record.Offset, 10)),
			}},
		})
	}
	return outputs
}
