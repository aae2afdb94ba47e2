// Command goclient computes mse_loss and its gradient with respect to input on a remoteloss
// server, from stubs generated out of protos/remoteloss/v1/loss.proto (see README.md).
//
//	goclient [-target HOST:PORT] [-reduction mean|sum|none] INPUT TARGET
//
// INPUT and TARGET are comma-separated numbers, sent as 1-d float32 tensors, e.g.
//
//	goclient -target localhost:50051 -reduction sum 1,2,3 0,0,0
//	loss: 14
//	grad_input: [2 4 6]
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	remotelossv1 "remoteloss.example/goclient/gen/remoteloss/v1"
)

// encode packs float32 values as a Tensor: little-endian bytes in C order, with the shape.
func encode(values []float32, requiresGrad bool) *remotelossv1.Tensor {
	data := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(v))
	}
	return &remotelossv1.Tensor{
		Dtype:        remotelossv1.DType_DTYPE_FLOAT32,
		Shape:        []int64{int64(len(values))},
		Data:         data,
		RequiresGrad: requiresGrad,
	}
}

// decode unpacks a float32 Tensor; a 0-d tensor (shape []) gives one value.
func decode(t *remotelossv1.Tensor) ([]float32, error) {
	if t.GetDtype() != remotelossv1.DType_DTYPE_FLOAT32 {
		return nil, fmt.Errorf("expected float32, got %v", t.GetDtype())
	}
	values := make([]float32, len(t.GetData())/4)
	for i := range values {
		values[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.GetData()[4*i:]))
	}
	return values, nil
}

func parse(text string) ([]float32, error) {
	var values []float32
	for _, field := range strings.Split(text, ",") {
		v, err := strconv.ParseFloat(strings.TrimSpace(field), 32)
		if err != nil {
			return nil, err
		}
		values = append(values, float32(v))
	}
	return values, nil
}

func main() {
	target := flag.String("target", "localhost:50051", "server address")
	reduction := flag.String("reduction", "mean", "none, mean or sum")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of the call")
	flag.Parse()
	if flag.NArg() != 2 {
		fmt.Fprintln(os.Stderr, "usage: goclient [-target HOST:PORT] [-reduction R] INPUT TARGET")
		os.Exit(2)
	}
	input, err1 := parse(flag.Arg(0))
	labels, err2 := parse(flag.Arg(1))
	enum, ok := remotelossv1.Reduction_value["REDUCTION_"+strings.ToUpper(*reduction)]
	if err1 != nil || err2 != nil || !ok {
		fmt.Fprintln(os.Stderr, "goclient: INPUT and TARGET are comma-separated numbers; -reduction is none, mean or sum")
		os.Exit(2)
	}

	// Plaintext, as the server listens by default. grpc-go 1.63+ prefers
	// grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials())).
	conn, err := grpc.Dial(*target, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, "goclient:", err)
		os.Exit(1)
	}
	defer conn.Close()
	client := remotelossv1.NewLossServiceClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	// The oneof `loss` holds one message per loss, named after its torch.nn.functional function.
	response, err := client.Compute(ctx, &remotelossv1.ComputeRequest{
		Loss: &remotelossv1.ComputeRequest_MseLoss{MseLoss: &remotelossv1.MseLoss{
			Input:     encode(input, true), // requires_grad: the answer carries its gradient
			Target:    encode(labels, false),
			Reduction: remotelossv1.Reduction(enum),
		}},
	})
	if err != nil {
		s := status.Convert(err) // e.g. INVALID_ARGUMENT with a message naming the argument
		fmt.Fprintf(os.Stderr, "goclient: %v: %s\n", s.Code(), s.Message())
		os.Exit(1)
	}
	for _, warning := range response.GetWarnings() {
		fmt.Fprintln(os.Stderr, "warning:", warning)
	}
	loss, err := decode(response.GetLoss())
	if err != nil {
		fmt.Fprintln(os.Stderr, "goclient: loss:", err)
		os.Exit(1)
	}
	grad, err := decode(response.GetGradients()["input"])
	if err != nil {
		fmt.Fprintln(os.Stderr, "goclient: grad_input:", err)
		os.Exit(1)
	}
	if len(response.GetLoss().GetShape()) == 0 {
		fmt.Println("loss:", loss[0])
	} else {
		fmt.Println("loss:", loss)
	}
	fmt.Println("grad_input:", grad)
}
