//! The coordinator core driven by scripts on a virtual clock: each test is a
//! script and the transcript of commands and events it must produce (see
//! `util/mod.rs` for the script language).

mod util;
use util::check;

#[test]
fn two_nodes_run_to_completion() {
    check(
        "
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        at 1
        done 2 loss=6 weight=4 tokens=20
        done 1 loss=2 weight=4 tokens=12
        done 1
        at 1.5
        done 2
        saved 1
        ack 1
        ack 2
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=1.0   at 1
            t=1.0   done 2 loss=6 weight=4 tokens=20
            t=1.0   done 1 loss=2 weight=4 tokens=12
              ev step 1 done g0 w2: loss 1.000 tokens 32 examples 4 wall 1.0s compute 0.30/0.30s comm 0.10/0.10s
              -> 1 run step 2 g0 w2 [6 7] save hash
              -> 2 run step 2 g0 w2 [4 5] hash
            t=1.0   done 1
            t=1.5   at 1.5
            t=1.5   done 2
              ev step 2 done g0 w2: loss 1.000 tokens 20 examples 4 wall 0.5s compute 0.30/0.30s comm 0.10/0.10s
            t=1.5   saved 1
              ev checkpoint recorded step 2
              ev stopping: training finished
              -> 1 stop: training finished
              -> 2 stop: training finished
            t=1.5   ack 1
            t=1.5   ack 2
              ev finished: completed 2 steps, checkpoint 2
            ",
    );
}

#[test]
fn ranks_follow_launcher_rank_then_host_and_slot() {
    check(
        "
        config world=4
        connect 1
        connect 2
        connect 3
        connect 4
        register 1 host=b lr=1
        register 2 host=a lr=0 launch=7
        register 3 host=b lr=0
        register 4 host=a lr=1
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   connect 3
            t=0.0   connect 4
            t=0.0   register 1 host=b lr=1
              ev registered node#1 b:1
              -> 1 accepted
            t=0.0   register 2 host=a lr=0 launch=7
              ev registered node#2 a:0
              -> 2 accepted
            t=0.0   register 3 host=b lr=0
              ev registered node#3 b:0
              -> 3 accepted
            t=0.0   register 4 host=a lr=1
              ev registered node#4 a:1
              ev run started g0 world 4 resume 0 ranks [0=2 1=4 2=3 3=1]
              -> 4 accepted
              -> 2 assign g0 rank 0/4 left r3@10.0.0.1:7000 right r1@10.0.0.4:7000 resume 0 total 2
              -> 4 assign g0 rank 1/4 left r0@10.0.0.2:7000 right r2@10.0.0.3:7000 resume 0 total 2
              -> 3 assign g0 rank 2/4 left r1@10.0.0.4:7000 right r3@10.0.0.1:7000 resume 0 total 2
              -> 1 assign g0 rank 3/4 left r2@10.0.0.3:7000 right r0@10.0.0.2:7000 resume 0 total 2
            ",
    );
}

#[test]
fn wrong_token_and_wrong_config_are_refused_and_the_run_goes_on() {
    check(
        "
        connect 1
        connect 9 bad
        register 9
        connect 3
        register 3 hash=other
        beat 3
        register 1
        connect 2
        register 2
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 9 bad
              ev refused node#9: wrong cluster token
              -> 9 refused: wrong cluster token
            t=0.0   register 9
              ev ignored node#9: message from a connection that is not admitted
            t=0.0   connect 3
            t=0.0   register 3 hash=other
              ev refused node#3: config hash 020202020202 differs from this run's 010101010101 (a node started with another config)
              -> 3 refused: config hash 020202020202 differs from this run's 010101010101 (a node started with another config)
            t=0.0   beat 3
              ev ignored node#3: message from a connection that is not admitted
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   connect 2
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            ",
    );
}

#[test]
fn bad_registrations_are_refused_with_the_reason() {
    check(
        "
        config world=3
        connect 1
        register 1 host=a lr=0
        connect 2
        register 2 host=a lr=0
        connect 3
        register 3 addr=none
        connect 4
        register 4 addr=0.0.0.0:7000
        connect 5
        register 5 addr=10.0.0.1:7000
        connect 6
        register 6 host=
        register 1
        ",
        "
            t=0.0   connect 1
            t=0.0   register 1 host=a lr=0
              ev registered node#1 a:0
              -> 1 accepted
            t=0.0   connect 2
            t=0.0   register 2 host=a lr=0
              ev refused node#2: a:0 is already registered by node#1 (each node on a host needs its own slot: --local-rank N or LOCAL_RANK; or the node it replaces is not yet declared dead)
              -> 2 refused: a:0 is already registered by node#1 (each node on a host needs its own slot: --local-rank N or LOCAL_RANK; or the node it replaces is not yet declared dead)
            t=0.0   connect 3
            t=0.0   register 3 addr=none
              ev refused node#3: no data-plane address (the QUIC ring needs one)
              -> 3 refused: no data-plane address (the QUIC ring needs one)
            t=0.0   connect 4
            t=0.0   register 4 addr=0.0.0.0:7000
              ev refused node#4: data-plane address 0.0.0.0:7000: a peer cannot connect to an unspecified address or port 0
              -> 4 refused: data-plane address 0.0.0.0:7000: a peer cannot connect to an unspecified address or port 0
            t=0.0   connect 5
            t=0.0   register 5 addr=10.0.0.1:7000
              ev refused node#5: data-plane address 10.0.0.1:7000 is already used by node#1
              -> 5 refused: data-plane address 10.0.0.1:7000 is already used by node#1
            t=0.0   connect 6
            t=0.0   register 6 host=
              ev refused node#6: bad identity: host name of 0 bytes (must be 1..=255)
              -> 6 refused: bad identity: host name of 0 bytes (must be 1..=255)
            t=0.0   register 1
              ev ignored node#1: already registered for generation 0
            ",
    );
}

#[test]
fn silent_node_is_declared_dead_within_the_timeout_and_the_run_stops() {
    check(
        "
        config hb=3
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        at 2
        done 1
        beat 1
        at 2.9
        at 3.0      # node 2 last spoke at 0.0: dead at exactly 3 s
        ack 1
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=2.0   at 2
            t=2.0   done 1
            t=2.0   beat 1
            t=2.9   at 2.9
            t=3.0   at 3.0
              ev failed: rank 1 (h2:0, node#2) went silent for 3.0s during step 1; declared dead
              ev stopping: run failed: rank 1 (h2:0, node#2) went silent for 3.0s during step 1; declared dead; restarts are disabled (max_restarts = 0)
              -> 2 disconnect: silent for 3.0s; declared dead
              -> 1 stop: run failed: rank 1 (h2:0, node#2) went silent for 3.0s during step 1; declared dead; restarts are disabled (max_restarts = 0)
            t=3.0   ack 1
              ev finished: failed: rank 1 (h2:0, node#2) went silent for 3.0s during step 1; declared dead; restarts are disabled (max_restarts = 0)
            ",
    );
}

#[test]
fn with_restarts_a_dead_node_means_restart_from_the_last_checkpoint() {
    check(
        "
        config hb=3 restarts=1 save=1 rejoin=10
        plan n=6 batch=2
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        done 1
        done 2
        saved 1 step=1
        done 1
        at 2.5
        beat 1
        at 3.5       # node 2 silent since 0.0 (its step 2 report never came)
        register 1   # the survivor registers again; a fresh process replaces node 2
        connect 3
        register 3
        ready 1
        ready 3
        fail 3 step=2 collective timeout waiting for rank 0
        ack 1
        ack 3
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 3
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 3
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1] save hash
              -> 2 run step 1 g0 w2 [0] hash
            t=0.0   done 1
            t=0.0   done 2
              ev step 1 done g0 w2: loss 1.000 tokens 20 examples 2 wall 0.0s compute 0.30/0.30s comm 0.10/0.10s
              -> 1 run step 2 g0 w2 [2] save hash
              -> 2 run step 2 g0 w2 [3] hash
            t=0.0   saved 1 step=1
              ev checkpoint recorded step 1
            t=0.0   done 1
            t=2.5   at 2.5
            t=2.5   beat 1
            t=3.5   at 3.5
              ev failed: rank 1 (h2:0, node#2) went silent for 3.5s during step 2; declared dead
              ev restarting g1 from step 1 (restart 1/1)
              -> 2 disconnect: silent for 3.5s; declared dead
              -> 1 restart g1 from step 1: rank 1 (h2:0, node#2) went silent for 3.5s during step 2; declared dead
            t=3.5   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=3.5   connect 3
            t=3.5   register 3
              ev registered node#3 h3:0
              ev run started g1 world 2 resume 1 ranks [0=1 1=3]
              -> 3 accepted
              -> 1 assign g1 rank 0/2 left r1@10.0.0.3:7000 right r1@10.0.0.3:7000 resume 1 total 3
              -> 3 assign g1 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 1 total 3
            t=3.5   ready 1
            t=3.5   ready 3
              -> 1 run step 2 g1 w2 [2] save hash
              -> 3 run step 2 g1 w2 [3] hash
            t=3.5   fail 3 step=2 collective timeout waiting for rank 0
              ev failed: rank 1 (h3:0, node#3) failed step 2: collective timeout waiting for rank 0
              ev stopping: run failed: rank 1 (h3:0, node#3) failed step 2: collective timeout waiting for rank 0; all 1 of max_restarts = 1 restarts used
              -> 1 stop: run failed: rank 1 (h3:0, node#3) failed step 2: collective timeout waiting for rank 0; all 1 of max_restarts = 1 restarts used
              -> 3 stop: run failed: rank 1 (h3:0, node#3) failed step 2: collective timeout waiting for rank 0; all 1 of max_restarts = 1 restarts used
            t=3.5   ack 1
            t=3.5   ack 3
              ev finished: failed: rank 1 (h3:0, node#3) failed step 2: collective timeout waiting for rank 0; all 1 of max_restarts = 1 restarts used
            ",
    );
}

#[test]
fn shrink_to_min_nodes_keeps_the_global_batch() {
    check(
        "
        config world=3 min=2 restarts=1 hb=10 rejoin=5
        plan n=6 batch=6
        connect 1
        connect 2
        connect 3
        register 1
        register 2
        register 3
        ready 1
        ready 2
        ready 3
        drop 3
        register 1
        register 2
        at 4.9
        at 5         # rejoin deadline: go on with 2 of 3
        ready 1
        ready 2
        done 1
        done 2
        saved 1
        ack 1
        ack 2
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   connect 3
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              -> 2 accepted
            t=0.0   register 3
              ev registered node#3 h3:0
              ev run started g0 world 3 resume 0 ranks [0=1 1=2 2=3]
              -> 3 accepted
              -> 1 assign g0 rank 0/3 left r2@10.0.0.3:7000 right r1@10.0.0.2:7000 resume 0 total 1
              -> 2 assign g0 rank 1/3 left r0@10.0.0.1:7000 right r2@10.0.0.3:7000 resume 0 total 1
              -> 3 assign g0 rank 2/3 left r1@10.0.0.2:7000 right r0@10.0.0.1:7000 resume 0 total 1
            t=0.0   ready 1
            t=0.0   ready 2
            t=0.0   ready 3
              -> 1 run step 1 g0 w3 [0 4] save hash
              -> 2 run step 1 g0 w3 [1 3] hash
              -> 3 run step 1 g0 w3 [2 5] hash
            t=0.0   drop 3
              ev failed: rank 2 (h3:0, node#3) disconnected during step 1
              ev restarting g1 from step 0 (restart 1/1)
              -> 1 restart g1 from step 0: rank 2 (h3:0, node#3) disconnected during step 1
              -> 2 restart g1 from step 0: rank 2 (h3:0, node#3) disconnected during step 1
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              -> 2 accepted
            t=4.9   at 4.9
            t=5.0   at 5
              ev run started g1 world 2 resume 0 ranks [0=1 1=2]
              -> 1 assign g1 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 1
              -> 2 assign g1 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 1
            t=5.0   ready 1
            t=5.0   ready 2
              -> 1 run step 1 g1 w2 [2 3 4] save hash
              -> 2 run step 1 g1 w2 [0 1 5] hash
            t=5.0   done 1
            t=5.0   done 2
              ev step 1 done g1 w2: loss 1.000 tokens 20 examples 6 wall 0.0s compute 0.30/0.30s comm 0.10/0.10s
            t=5.0   saved 1
              ev checkpoint recorded step 1
              ev stopping: training finished
              -> 1 stop: training finished
              -> 2 stop: training finished
            t=5.0   ack 1
            t=5.0   ack 2
              ev finished: completed 1 steps, checkpoint 1
            ",
    );
}

#[test]
fn without_min_nodes_a_missing_node_after_restart_stops_the_run() {
    check(
        "
        config restarts=2 rejoin=4 hb=10
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        drop 2
        register 1
        at 4
        ack 1
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=0.0   drop 2
              ev failed: rank 1 (h2:0, node#2) disconnected during step 1
              ev restarting g1 from step 0 (restart 1/2)
              -> 1 restart g1 from step 0: rank 1 (h2:0, node#2) disconnected during step 1
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=4.0   at 4
              ev stopping: run failed: only 1 node(s) registered within 4.0s for generation 1; the run needs at least 2
              -> 1 stop: run failed: only 1 node(s) registered within 4.0s for generation 1; the run needs at least 2
            t=4.0   ack 1
              ev finished: failed: only 1 node(s) registered within 4.0s for generation 1; the run needs at least 2
            ",
    );
}

#[test]
fn adapter_hash_mismatch_stops_naming_the_ranks() {
    check(
        "
        config world=3 hashevery=1 restarts=5
        plan n=6 batch=3
        connect 1
        connect 2
        connect 3
        register 1
        register 2
        register 3
        ready 1
        ready 2
        ready 3
        done 1
        done 2 hash=b
        done 3
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   connect 3
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              -> 2 accepted
            t=0.0   register 3
              ev registered node#3 h3:0
              ev run started g0 world 3 resume 0 ranks [0=1 1=2 2=3]
              -> 3 accepted
              -> 1 assign g0 rank 0/3 left r2@10.0.0.3:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/3 left r0@10.0.0.1:7000 right r2@10.0.0.3:7000 resume 0 total 2
              -> 3 assign g0 rank 2/3 left r1@10.0.0.2:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
            t=0.0   ready 3
              -> 1 run step 1 g0 w3 [1] hash
              -> 2 run step 1 g0 w3 [2] hash
              -> 3 run step 1 g0 w3 [0] hash
            t=0.0   done 1
            t=0.0   done 2 hash=b
            t=0.0   done 3
              ev stopping: run failed: adapter hashes disagree after step 1: ranks [0, 2] 616161616161; rank 1 626262626262
              -> 1 stop: run failed: adapter hashes disagree after step 1: ranks [0, 2] 616161616161; rank 1 626262626262
              -> 2 stop: run failed: adapter hashes disagree after step 1: ranks [0, 2] 616161616161; rank 1 626262626262
              -> 3 stop: run failed: adapter hashes disagree after step 1: ranks [0, 2] 616161616161; rank 1 626262626262
            ",
    );
}

#[test]
fn missing_adapter_hash_is_a_protocol_failure() {
    check(
        "
        config world=1 hashevery=1
        plan n=4 batch=4
        connect 1
        register 1
        ready 1
        done 1 hash=none
        ",
        "
            t=0.0   connect 1
            t=0.0   register 1
              ev registered node#1 h1:0
              ev run started g0 world 1 resume 0 ranks [0=1]
              -> 1 accepted
              -> 1 assign g0 rank 0/1 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 1
            t=0.0   ready 1
              -> 1 run step 1 g0 w1 [0 1 2 3] save hash
            t=0.0   done 1 hash=none
              ev failed: rank 0 (h1:0, node#1) broke the protocol during step 1: no adapter hash, though the step order asked for one
              ev stopping: run failed: rank 0 (h1:0, node#1) broke the protocol during step 1: no adapter hash, though the step order asked for one; restarts are disabled (max_restarts = 0)
              -> 1 stop: run failed: rank 0 (h1:0, node#1) broke the protocol during step 1: no adapter hash, though the step order asked for one; restarts are disabled (max_restarts = 0)
            ",
    );
}

#[test]
fn stale_unknown_and_wrong_step_reports() {
    check(
        "
        config restarts=1 save=1
        plan n=8 batch=2
        connect 1
        connect 2
        register 1
        register 2
        done 1 step=1      # before setup finished
        ready 1
        ready 2
        ready 1
        done 1
        done 1             # duplicate
        done 7 step=1      # unknown connection
        done 2 gen=4       # another generation
        done 2
        saved 1            # confirms step 2 before its barrier
        saved 1            # twice
        done 2 step=1      # already complete
        saved 2            # only rank 0 writes checkpoints
        saved 1 step=1     # barrier passed: recorded now
        saved 1 step=1     # already recorded
        done 1 step=5      # from the future: a diverged rank
        done 2 gen=0       # stale after the restart
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 4
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 4
            t=0.0   done 1 step=1
              ev ignored node#1: report for step 1, but no step is in flight
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1] save hash
              -> 2 run step 1 g0 w2 [0] hash
            t=0.0   ready 1
              ev ignored node#1: ready, but the ring is past setup
            t=0.0   done 1
            t=0.0   done 1
              ev ignored node#1: second report for step 1 from rank 0
            t=0.0   done 7 step=1
              ev ignored node#7: message from a connection that is not admitted
            t=0.0   done 2 gen=4
              ev ignored node#2: step report for generation 4, but the run is at generation 0 (stale)
            t=0.0   done 2
              ev step 1 done g0 w2: loss 1.000 tokens 20 examples 2 wall 0.0s compute 0.30/0.30s comm 0.10/0.10s
              -> 1 run step 2 g0 w2 [2] save hash
              -> 2 run step 2 g0 w2 [3] hash
            t=0.0   saved 1
            t=0.0   saved 1
              ev ignored node#1: second checkpoint confirmation for step 2
            t=0.0   done 2 step=1
              ev ignored node#2: report for step 1, which is already complete
            t=0.0   saved 2
              ev ignored node#2: checkpoint confirmation from rank 1; only rank 0 writes checkpoints
            t=0.0   saved 1 step=1
              ev checkpoint recorded step 1
            t=0.0   saved 1 step=1
              ev ignored node#1: checkpoint confirmation for step 1, which no save was pending for
            t=0.0   done 1 step=5
              ev failed: rank 0 (h1:0, node#1) broke the protocol during step 2: reported step 5 while step 2 is in flight
              ev restarting g1 from step 1 (restart 1/1)
              -> 1 restart g1 from step 1: rank 0 (h1:0, node#1) broke the protocol during step 2: reported step 5 while step 2 is in flight
              -> 2 restart g1 from step 1: rank 0 (h1:0, node#1) broke the protocol during step 2: reported step 5 while step 2 is in flight
            t=0.0   done 2 gen=0
              ev ignored node#2: step report for generation 0, but the run is at generation 1 (stale)
            ",
    );
}

#[test]
fn interrupt_stops_every_node_and_waits_for_acks_with_a_timeout() {
    check(
        "
        config stop=2
        connect 1
        connect 2
        register 1
        register 2
        connect 3
        interrupt
        ack 2
        register 3
        at 1.9
        at 2.0
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   connect 3
            t=0.0   interrupt
              ev stopping: interrupted by the user
              -> 1 stop: interrupted by the user
              -> 2 stop: interrupted by the user
              -> 3 stop: interrupted by the user
            t=0.0   ack 2
            t=0.0   register 3
              ev refused node#3: the run is stopping
              -> 3 refused: the run is stopping
            t=1.9   at 1.9
            t=2.0   at 2.0
              ev stop timed out, unacked [1]
              ev finished: interrupted after step 0, checkpoint 0
            ",
    );
}

#[test]
fn second_interrupt_stops_waiting() {
    check(
        "
        connect 1
        interrupt
        interrupt
        ack 1
        ",
        "
            t=0.0   connect 1
            t=0.0   interrupt
              ev stopping: interrupted by the user
              -> 1 stop: interrupted by the user
            t=0.0   interrupt
              ev stop timed out, unacked [1]
              ev finished: interrupted after step 0, checkpoint 0
            t=0.0   ack 1
              ev ignored node#1: the run is over
            ",
    );
}

#[test]
fn join_timeout_starts_with_min_nodes_or_fails() {
    check(
        "
        config world=3 min=2 join=10 hb=100
        connect 1
        connect 2
        register 1
        at 5
        beat 1
        register 2
        at 10
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=5.0   at 5
            t=5.0   beat 1
            t=5.0   register 2
              ev registered node#2 h2:0
              -> 2 accepted
            t=10.0  at 10
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            ",
    );
    check(
        "
        config world=3 join=10 stop=1 hb=100
        connect 1
        register 1
        at 5
        beat 1
        at 10
        ",
        "
            t=0.0   connect 1
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=5.0   at 5
            t=5.0   beat 1
            t=10.0  at 10
              ev stopping: run failed: only 1 node(s) registered within 10.0s for generation 0; the run needs at least 3
              -> 1 stop: run failed: only 1 node(s) registered within 10.0s for generation 0; the run needs at least 3
            ",
    );
}

#[test]
fn nccl_unique_id_from_rank_0_goes_to_the_others() {
    check(
        "
        config world=3 transport=nccl
        connect 1
        connect 2
        connect 3
        register 1 addr=none
        register 2 addr=none
        register 3 addr=none
        nccl 2 len=128     # not rank 0
        nccl 1 len=128
        nccl 1 len=128     # twice
        ready 1
        ready 2
        ready 3
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   connect 3
            t=0.0   register 1 addr=none
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2 addr=none
              ev registered node#2 h2:0
              -> 2 accepted
            t=0.0   register 3 addr=none
              ev registered node#3 h3:0
              ev run started g0 world 3 resume 0 ranks [0=1 1=2 2=3]
              -> 3 accepted
              -> 1 assign g0 rank 0/3 nccl create_id=true resume 0 total 2
              -> 2 assign g0 rank 1/3 nccl create_id=false resume 0 total 2
              -> 3 assign g0 rank 2/3 nccl create_id=false resume 0 total 2
            t=0.0   nccl 2 len=128
              ev ignored node#2: an unexpected NCCL unique id from rank 1
            t=0.0   nccl 1 len=128
              -> 2 nccl id g0 (128 bytes)
              -> 3 nccl id g0 (128 bytes)
            t=0.0   nccl 1 len=128
              ev ignored node#1: a second NCCL unique id from rank 0
            t=0.0   ready 1
            t=0.0   ready 2
            t=0.0   ready 3
              -> 1 run step 1 g0 w3 [1]
              -> 2 run step 1 g0 w3 [2]
              -> 3 run step 1 g0 w3 [0 3]
            ",
    );
    check(
        "
        config world=2 transport=nccl
        connect 1
        connect 2
        register 1
        register 2
        nccl 1 len=5000
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 nccl create_id=true resume 0 total 2
              -> 2 assign g0 rank 1/2 nccl create_id=false resume 0 total 2
            t=0.0   nccl 1 len=5000
              ev failed: rank 0 (h1:0, node#1) broke the protocol during step 1: NCCL unique id of 5000 bytes (must be 1..=1024)
              ev stopping: run failed: rank 0 (h1:0, node#1) broke the protocol during step 1: NCCL unique id of 5000 bytes (must be 1..=1024); restarts are disabled (max_restarts = 0)
              -> 1 stop: run failed: rank 0 (h1:0, node#1) broke the protocol during step 1: NCCL unique id of 5000 bytes (must be 1..=1024); restarts are disabled (max_restarts = 0)
              -> 2 stop: run failed: rank 0 (h1:0, node#1) broke the protocol during step 1: NCCL unique id of 5000 bytes (must be 1..=1024); restarts are disabled (max_restarts = 0)
            ",
    );
}

#[test]
fn a_step_that_never_finishes_times_out_even_with_heartbeats() {
    check(
        "
        config step=10 hb=3
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        done 1
        at 2
        beat 1
        beat 2
        at 4
        beat 1
        beat 2
        at 6
        beat 1
        beat 2
        at 8
        beat 1
        beat 2
        at 10
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=0.0   done 1
            t=2.0   at 2
            t=2.0   beat 1
            t=2.0   beat 2
            t=4.0   at 4
            t=4.0   beat 1
            t=4.0   beat 2
            t=6.0   at 6
            t=6.0   beat 1
            t=6.0   beat 2
            t=8.0   at 8
            t=8.0   beat 1
            t=8.0   beat 2
            t=10.0  at 10
              ev failed: step 1 timed out after 10.0s waiting for rank 1
              ev stopping: run failed: step 1 timed out after 10.0s waiting for rank 1; restarts are disabled (max_restarts = 0)
              -> 1 stop: run failed: step 1 timed out after 10.0s waiting for rank 1; restarts are disabled (max_restarts = 0)
              -> 2 stop: run failed: step 1 timed out after 10.0s waiting for rank 1; restarts are disabled (max_restarts = 0)
            ",
    );
}

#[test]
fn setup_timeout_names_the_ranks_not_ready() {
    check(
        "
        config world=2 setup=20 hb=30
        connect 1
        connect 2
        register 1
        register 2
        ready 2
        at 20
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 2
            t=20.0  at 20
              ev failed: setup timed out after 20.0s waiting for rank 0 to report ready
              ev stopping: run failed: setup timed out after 20.0s waiting for rank 0 to report ready; restarts are disabled (max_restarts = 0)
              -> 1 stop: run failed: setup timed out after 20.0s waiting for rank 0 to report ready; restarts are disabled (max_restarts = 0)
              -> 2 stop: run failed: setup timed out after 20.0s waiting for rank 0 to report ready; restarts are disabled (max_restarts = 0)
            ",
    );
}

#[test]
fn checkpoint_orchestration_confirm_before_barrier_and_save_timeout() {
    check(
        "
        config world=2 save=1 savet=5
        plan n=4 batch=2
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        done 1
        saved 1      # rank 0 confirms before rank 1 reported: recorded at the barrier
        done 2
        done 1
        at 2
        beat 1
        done 2       # barrier of step 2 at t=2: rank 0 has until 7 to confirm
        beat 1
        beat 2
        at 4
        beat 1
        beat 2
        at 7
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1] save hash
              -> 2 run step 1 g0 w2 [0] hash
            t=0.0   done 1
            t=0.0   saved 1
            t=0.0   done 2
              ev step 1 done g0 w2: loss 1.000 tokens 20 examples 2 wall 0.0s compute 0.30/0.30s comm 0.10/0.10s
              ev checkpoint recorded step 1
              -> 1 run step 2 g0 w2 [2] save hash
              -> 2 run step 2 g0 w2 [3] hash
            t=0.0   done 1
            t=2.0   at 2
            t=2.0   beat 1
            t=2.0   done 2
              ev step 2 done g0 w2: loss 1.000 tokens 20 examples 2 wall 2.0s compute 0.30/0.30s comm 0.10/0.10s
            t=2.0   beat 1
            t=2.0   beat 2
            t=4.0   at 4
            t=4.0   beat 1
            t=4.0   beat 2
            t=7.0   at 7
              ev failed: rank 0 did not confirm the checkpoint of step 2 within 5.0s
              ev stopping: run failed: rank 0 did not confirm the checkpoint of step 2 within 5.0s; restarts are disabled (max_restarts = 0)
              -> 1 stop: run failed: rank 0 did not confirm the checkpoint of step 2 within 5.0s; restarts are disabled (max_restarts = 0)
              -> 2 stop: run failed: rank 0 did not confirm the checkpoint of step 2 within 5.0s; restarts are disabled (max_restarts = 0)
            ",
    );
}

#[test]
fn standby_node_fills_the_ring_after_a_restart() {
    check(
        "
        config world=2 restarts=1 hb=5
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        connect 3
        register 3
        connect 4
        register 4
        connect 5
        register 5     # only world_size standbys
        fail 2 step=1 CUDA out of memory
        register 1
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=0.0   connect 3
            t=0.0   register 3
              ev registered node#3 h3:0 (standby)
              -> 3 accepted (standby)
            t=0.0   connect 4
            t=0.0   register 4
              ev registered node#4 h4:0 (standby)
              -> 4 accepted (standby)
            t=0.0   connect 5
            t=0.0   register 5
              ev refused node#5: the run is full (4 nodes including standbys)
              -> 5 refused: the run is full (4 nodes including standbys)
            t=0.0   fail 2 step=1 CUDA out of memory
              ev failed: rank 1 (h2:0, node#2) failed step 1: CUDA out of memory
              ev restarting g1 from step 0 (restart 1/1)
              ev run started g1 world 2 resume 0 ranks [0=3 1=4]
              -> 1 restart g1 from step 0: rank 1 (h2:0, node#2) failed step 1: CUDA out of memory
              -> 2 restart g1 from step 0: rank 1 (h2:0, node#2) failed step 1: CUDA out of memory
              -> 3 assign g1 rank 0/2 left r1@10.0.0.4:7000 right r1@10.0.0.4:7000 resume 0 total 2
              -> 4 assign g1 rank 1/2 left r0@10.0.0.3:7000 right r0@10.0.0.3:7000 resume 0 total 2
            t=0.0   register 1
              ev registered node#1 h1:0 (standby)
              -> 1 accepted (standby)
            ",
    );
}

#[test]
fn node_failure_report_with_restarts_exhausted() {
    check(
        "
        config world=1 restarts=1
        plan n=4 batch=2
        connect 1
        register 1
        ready 1
        fail 1 step=1 NaN in gradients
        register 1
        ready 1
        fail 1 step=1 NaN in gradients again
        ack 1
        ",
        "
            t=0.0   connect 1
            t=0.0   register 1
              ev registered node#1 h1:0
              ev run started g0 world 1 resume 0 ranks [0=1]
              -> 1 accepted
              -> 1 assign g0 rank 0/1 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
              -> 1 run step 1 g0 w1 [0 1]
            t=0.0   fail 1 step=1 NaN in gradients
              ev failed: rank 0 (h1:0, node#1) failed step 1: NaN in gradients
              ev restarting g1 from step 0 (restart 1/1)
              -> 1 restart g1 from step 0: rank 0 (h1:0, node#1) failed step 1: NaN in gradients
            t=0.0   register 1
              ev registered node#1 h1:0
              ev run started g1 world 1 resume 0 ranks [0=1]
              -> 1 accepted
              -> 1 assign g1 rank 0/1 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
              -> 1 run step 1 g1 w1 [0 1]
            t=0.0   fail 1 step=1 NaN in gradients again
              ev failed: rank 0 (h1:0, node#1) failed step 1: NaN in gradients again
              ev stopping: run failed: rank 0 (h1:0, node#1) failed step 1: NaN in gradients again; all 1 of max_restarts = 1 restarts used
              -> 1 stop: run failed: rank 0 (h1:0, node#1) failed step 1: NaN in gradients again; all 1 of max_restarts = 1 restarts used
            t=0.0   ack 1
              ev finished: failed: rank 0 (h1:0, node#1) failed step 1: NaN in gradients again; all 1 of max_restarts = 1 restarts used
            ",
    );
}

#[test]
fn invalid_settings_are_errors_naming_the_field() {
    use ringtune_coordinator::*;
    use std::time::Duration;
    let check = |edit: &dyn Fn(&mut CoordinatorConfig), expect: &str| {
        let mut cfg = CoordinatorConfig::new(util::RUN_HASH, WorldSize(4));
        edit(&mut cfg);
        let got = match Coordinator::new(cfg, util::plan(8, 4, 1), std::time::Instant::now()) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        assert_eq!(got, expect);
    };
    check(&|_| {}, "ok");
    check(&|c| c.min_nodes = WorldSize(1), "ok");
    check(
        &|c| c.world_size = WorldSize(0),
        "coordinator setting `world_size`: 0 is not in 1..=65536",
    );
    check(
        &|c| c.min_nodes = WorldSize(5),
        "coordinator setting `min_nodes`: 5 is not in 1..=world_size (4)",
    );
    check(
        &|c| c.min_nodes = WorldSize(0),
        "coordinator setting `min_nodes`: 0 is not in 1..=world_size (4)",
    );
    check(
        &|c| c.save_every = Some(0),
        "coordinator setting `save_every`: must be at least 1 when set",
    );
    check(
        &|c| c.max_steps = Some(0),
        "coordinator setting `max_steps`: must be at least 1 when set",
    );
    check(
        &|c| c.timeouts.heartbeat = Duration::ZERO,
        "coordinator setting `timeouts.heartbeat`: must be longer than zero",
    );
    check(
        &|c| c.timeouts.stop = Duration::ZERO,
        "coordinator setting `timeouts.stop`: must be longer than zero",
    );
}

#[test]
fn max_steps_caps_the_plan_and_the_last_step_is_saved() {
    check(
        "
        config world=1 steps=1
        plan n=12 batch=4
        connect 1
        register 1
        ready 1
        done 1
        saved 1
        ack 1
        ",
        "
            t=0.0   connect 1
            t=0.0   register 1
              ev registered node#1 h1:0
              ev run started g0 world 1 resume 0 ranks [0=1]
              -> 1 accepted
              -> 1 assign g0 rank 0/1 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 1
            t=0.0   ready 1
              -> 1 run step 1 g0 w1 [0 1 2 3] save hash
            t=0.0   done 1
              ev step 1 done g0 w1: loss 1.000 tokens 10 examples 4 wall 0.0s compute 0.30/0.30s comm 0.10/0.10s
            t=0.0   saved 1
              ev checkpoint recorded step 1
              ev stopping: training finished
              -> 1 stop: training finished
            t=0.0   ack 1
              ev finished: completed 1 steps, checkpoint 1
            ",
    );
}

#[test]
fn interrupt_while_running_finishes_the_step_saves_after_it_and_stops() {
    check(
        "
        config steps=3
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        at 1
        interrupt
        done 1
        done 2
        saved 1
        ack 1
        ack 2
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=1.0   at 1
            t=1.0   interrupt
              ev interrupting: finish step 1, save, stop
            t=1.0   done 1
            t=1.0   done 2
              ev step 1 done g0 w2: loss 1.000 tokens 20 examples 4 wall 1.0s compute 0.30/0.30s comm 0.10/0.10s
              -> 1 save g0 after step 1
            t=1.0   saved 1
              ev checkpoint recorded step 1
              ev stopping: interrupted by the user
              -> 1 stop: interrupted by the user
              -> 2 stop: interrupted by the user
            t=1.0   ack 1
            t=1.0   ack 2
              ev finished: interrupted after step 1, checkpoint 1
            ",
    );
}

/// A node that got a stop signal of its own stops the run as the user's interrupt does:
/// the step in flight finishes and is saved. The other node's request (a launcher
/// signals them all) and then the user's own first interrupt are the same request, not a
/// second one that would stop at once.
#[test]
fn a_nodes_own_interrupt_stops_the_run_after_a_save() {
    check(
        "
        config steps=3
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        at 1
        node-interrupt 2
        node-interrupt 1
        interrupt
        done 1
        done 2
        saved 1
        ack 1
        ack 2
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=1.0   at 1
            t=1.0   node-interrupt 2
              ev rank 1 (h2:0, node#2) asked to stop
              ev interrupting: finish step 1, save, stop
            t=1.0   node-interrupt 1
            t=1.0   interrupt
            t=1.0   done 1
            t=1.0   done 2
              ev step 1 done g0 w2: loss 1.000 tokens 20 examples 4 wall 1.0s compute 0.30/0.30s comm 0.10/0.10s
              -> 1 save g0 after step 1
            t=1.0   saved 1
              ev checkpoint recorded step 1
              ev stopping: interrupted by the user
              -> 1 stop: interrupted by the user
              -> 2 stop: interrupted by the user
            t=1.0   ack 1
            t=1.0   ack 2
              ev finished: interrupted after step 1, checkpoint 1
            ",
    );
}

/// A second interrupt while rank 0 saves stops at once; a failure while it saves stops
/// the run too (no restart: it was stopping anyway), keeping the last recorded checkpoint.
#[test]
fn interrupt_again_or_a_failure_during_the_final_save_stops_at_once() {
    check(
        "
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        interrupt
        done 1
        done 2
        interrupt
        ack 1
        ack 2
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=0.0   interrupt
              ev interrupting: finish step 1, save, stop
            t=0.0   done 1
            t=0.0   done 2
              ev step 1 done g0 w2: loss 1.000 tokens 20 examples 4 wall 0.0s compute 0.30/0.30s comm 0.10/0.10s
              -> 1 save g0 after step 1
            t=0.0   interrupt
              ev stopping: interrupted by the user
              -> 1 stop: interrupted by the user
              -> 2 stop: interrupted by the user
            t=0.0   ack 1
            t=0.0   ack 2
              ev finished: interrupted after step 1, checkpoint 0
            ",
    );
    check(
        "
        config restarts=3
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        interrupt
        done 1
        done 2
        drop 1
        ack 2
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=0.0   interrupt
              ev interrupting: finish step 1, save, stop
            t=0.0   done 1
            t=0.0   done 2
              ev step 1 done g0 w2: loss 1.000 tokens 20 examples 4 wall 0.0s compute 0.30/0.30s comm 0.10/0.10s
              -> 1 save g0 after step 1
            t=0.0   drop 1
              ev failed: rank 0 (h1:0, node#1) disconnected during step 1
              ev checkpoint lost step 1 (last step 0)
              ev stopping: interrupted by the user
              -> 2 stop: interrupted by the user
            t=0.0   ack 2
              ev finished: interrupted after step 1, checkpoint 0
            ",
    );
}

/// A launcher that saw a node's process end says so (`exit HOST SLOT`): the coordinator
/// treats it as that node's disconnect at once, instead of waiting for the heartbeat
/// timeout. An exit of a process it does not know changes nothing.
#[test]
fn a_process_exit_seen_by_the_launcher_is_that_nodes_disconnect() {
    check(
        "
        connect 1
        connect 2
        register 1
        register 2
        ready 1
        ready 2
        exit h9 0
        exit h2 0
        ack 1
        ",
        "
            t=0.0   connect 1
            t=0.0   connect 2
            t=0.0   register 1
              ev registered node#1 h1:0
              -> 1 accepted
            t=0.0   register 2
              ev registered node#2 h2:0
              ev run started g0 world 2 resume 0 ranks [0=1 1=2]
              -> 2 accepted
              -> 1 assign g0 rank 0/2 left r1@10.0.0.2:7000 right r1@10.0.0.2:7000 resume 0 total 2
              -> 2 assign g0 rank 1/2 left r0@10.0.0.1:7000 right r0@10.0.0.1:7000 resume 0 total 2
            t=0.0   ready 1
            t=0.0   ready 2
              -> 1 run step 1 g0 w2 [1]
              -> 2 run step 1 g0 w2 [0 2 3]
            t=0.0   exit h9 0
            t=0.0   exit h2 0
              ev failed: rank 1 (h2:0, node#2) disconnected during step 1
              ev stopping: run failed: rank 1 (h2:0, node#2) disconnected during step 1; restarts are disabled (max_restarts = 0)
              -> 1 stop: run failed: rank 1 (h2:0, node#2) disconnected during step 1; restarts are disabled (max_restarts = 0)
            t=0.0   ack 1
              ev finished: failed: rank 1 (h2:0, node#2) disconnected during step 1; restarts are disabled (max_restarts = 0)
            ",
    );
}
