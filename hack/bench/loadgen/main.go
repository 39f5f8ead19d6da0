// Command loadgen drives HTTP load for the benchmarks and reports, as JSON on stdout, what it saw
// and what it cost itself (CPU), so that it is never the hidden bottleneck.
//
//	loadgen -url URL -body JSON -concurrency 32 -duration 10s           # request/response
//	loadgen -url URL -body JSON -rate 500 -duration 10s                 # open loop: a fixed request rate
//	loadgen -url URL -body JSON -mode stream -streams 1000              # each worker: one SSE stream
//
// Latencies are per request (request mode) or time to first content chunk and gaps between
// chunks (stream mode). Only loopback URLs are accepted.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ", ") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

type report struct {
	Mode          string         `json:"mode"`
	Concurrency   int            `json:"concurrency"`
	DurationS     float64        `json:"duration_s"`
	Requests      int            `json:"requests"`
	Errors        int            `json:"errors"`
	StatusCounts  map[string]int `json:"status_counts"`
	RPS           float64        `json:"rps"`
	LatencyMs     quantiles      `json:"latency_ms"`
	TTFTMs        quantiles      `json:"ttft_ms,omitempty"`
	ChunkGapMs    quantiles      `json:"chunk_gap_ms,omitempty"`
	Chunks        int            `json:"chunks,omitempty"`
	CPUUserS      float64        `json:"loadgen_cpu_user_s"`
	CPUSystemS    float64        `json:"loadgen_cpu_system_s"`
	CPUPercentOf1 float64        `json:"loadgen_cpu_percent_of_one_core"`
	FirstErrors   []string       `json:"first_errors,omitempty"`
}

type quantiles struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
	N    int     `json:"n"`
}

func summarize(values []time.Duration) quantiles {
	if len(values) == 0 {
		return quantiles{}
	}
	sort.Slice(values, func(i, j int) bool { return values[i] < values[j] })
	at := func(q float64) float64 {
		index := int(q * float64(len(values)-1))
		return float64(values[index].Microseconds()) / 1000
	}
	var total time.Duration
	for _, v := range values {
		total += v
	}
	return quantiles{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: at(1), N: len(values),
		Mean: float64(total.Microseconds()) / 1000 / float64(len(values))}
}

type collector struct {
	mu        sync.Mutex
	latencies []time.Duration
	ttfts     []time.Duration
	gaps      []time.Duration
	status    map[string]int
	errors    int
	chunks    int
	firstErrs []string
}

func (c *collector) fail(err string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.errors++
	if len(c.firstErrs) < 5 {
		c.firstErrs = append(c.firstErrs, err)
	}
}

func main() {
	target := flag.String("url", "", "URL to POST to (loopback only)")
	body := flag.String("body", "{}", "JSON request body")
	mode := flag.String("mode", "request", "request or stream")
	concurrency := flag.Int("concurrency", 1, "parallel workers (request mode)")
	duration := flag.Duration("duration", 10*time.Second, "how long to send (request mode)")
	streams := flag.Int("streams", 1, "concurrent streams, one per worker (stream mode)")
	rate := flag.Float64("rate", 0, "requests per second, sent on schedule whatever the answers (open loop); 0: closed loop")
	timeout := flag.Duration("timeout", 120*time.Second, "deadline of one request or stream")
	var headers headerList
	flag.Var(&headers, "header", "extra header, 'Name: value' (repeatable)")
	flag.Parse()

	parsed, err := url.Parse(*target)
	if err != nil || (parsed.Hostname() != "127.0.0.1" && parsed.Hostname() != "localhost") {
		log.Fatalf("loadgen: only loopback URLs are allowed, got %q", *target)
	}
	workers := *concurrency
	if *mode == "stream" {
		workers = *streams
	}
	// Idle connections kept for reuse. In the open loop the requests in flight come and go, and with
	// Go's default of 2 a burst above it closed its extra connections and opened new ones later: at
	// 500 req/s 18 % of the requests paid for a new connection, which cost a Python server far more
	// than the Go upstream it is compared with. 100 is what the openai SDK keeps alive.
	idle := workers * 2
	if *rate > 0 && idle < 100 {
		idle = 100
	}
	client := &http.Client{
		Timeout: *timeout,
		Transport: &http.Transport{MaxIdleConns: idle, MaxIdleConnsPerHost: idle,
			DisableCompression: true, IdleConnTimeout: 90 * time.Second},
	}
	send := func() (*http.Response, error) {
		request, err := http.NewRequest(http.MethodPost, *target, bytes.NewBufferString(*body))
		if err != nil {
			return nil, err
		}
		request.Header.Set("Content-Type", "application/json")
		for _, h := range headers {
			name, value, _ := strings.Cut(h, ":")
			request.Header.Set(strings.TrimSpace(name), strings.TrimSpace(value))
		}
		return client.Do(request)
	}

	results := &collector{status: map[string]int{}}
	var before syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	started := time.Now()
	var wg sync.WaitGroup
	if *mode == "stream" {
		// Every stream starts together and is held to its end: the scale test's shape.
		gate := make(chan struct{})
		for i := 0; i < workers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-gate
				stream(send, results)
			}()
		}
		close(gate)
	} else if *rate > 0 {
		// Open loop: requests leave on a fixed schedule, so a slow server shows as latency, not as a
		// lower offered load (the closed loop's coordinated omission).
		interval := time.Duration(float64(time.Second) / *rate)
		deadline := started.Add(*duration)
		for next := started; next.Before(deadline); next = next.Add(interval) {
			time.Sleep(time.Until(next))
			wg.Add(1)
			go func() {
				defer wg.Done()
				one(send, results)
			}()
		}
	} else {
		deadline := started.Add(*duration)
		for i := 0; i < workers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(deadline) {
					one(send, results)
				}
			}()
		}
	}
	wg.Wait()
	elapsed := time.Since(started)
	var after syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	user := float64(after.Utime.Nano()-before.Utime.Nano()) / 1e9
	system := float64(after.Stime.Nano()-before.Stime.Nano()) / 1e9

	out := report{
		Mode: *mode, Concurrency: workers, DurationS: elapsed.Seconds(), Requests: len(results.latencies),
		Errors: results.errors, StatusCounts: results.status, RPS: float64(len(results.latencies)) / elapsed.Seconds(),
		LatencyMs: summarize(results.latencies), TTFTMs: summarize(results.ttfts), ChunkGapMs: summarize(results.gaps),
		Chunks: results.chunks, CPUUserS: user, CPUSystemS: system,
		CPUPercentOf1: 100 * (user + system) / elapsed.Seconds(), FirstErrors: results.firstErrs,
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", "  ")
	if err := encoder.Encode(out); err != nil {
		log.Fatal(err)
	}
}

func one(send func() (*http.Response, error), results *collector) {
	began := time.Now()
	response, err := send()
	if err != nil {
		results.fail(err.Error())
		return
	}
	_, err = io.Copy(io.Discard, response.Body)
	response.Body.Close()
	latency := time.Since(began)
	results.mu.Lock()
	defer results.mu.Unlock()
	results.status[fmt.Sprint(response.StatusCode)]++
	if err != nil || response.StatusCode != http.StatusOK {
		results.errors++
		return
	}
	results.latencies = append(results.latencies, latency)
}

func stream(send func() (*http.Response, error), results *collector) {
	began := time.Now()
	response, err := send()
	if err != nil {
		results.fail(err.Error())
		return
	}
	defer response.Body.Close()
	if response.StatusCode != http.StatusOK {
		results.fail(fmt.Sprintf("HTTP %d", response.StatusCode))
		return
	}
	reader := bufio.NewReader(response.Body)
	var first time.Duration
	var gaps []time.Duration
	last := time.Time{}
	chunks := 0
	done := false
	for {
		line, err := reader.ReadString('\n')
		if strings.HasPrefix(line, "data: ") {
			payload := strings.TrimSpace(line[6:])
			now := time.Now()
			if payload == "[DONE]" {
				done = true
				break
			}
			if strings.Contains(payload, `"error"`) {
				results.fail("error event: " + payload)
				return
			}
			if strings.Contains(payload, `"content"`) {
				chunks++
				if first == 0 {
					first = now.Sub(began)
				} else {
					gaps = append(gaps, now.Sub(last))
				}
				last = now
			}
		}
		if err != nil {
			break
		}
	}
	if !done {
		results.fail("stream ended before [DONE]")
		return
	}
	results.mu.Lock()
	defer results.mu.Unlock()
	results.status["200"]++
	results.latencies = append(results.latencies, time.Since(began))
	results.ttfts = append(results.ttfts, first)
	results.gaps = append(results.gaps, gaps...)
	results.chunks += chunks
}
