/*
 * Network signatures: matched against the first bytes (1 KiB) of each flow's payload, per
 * direction (sva net, detectors/net_payload.py).
 *
 * The built-in memory scan also loads every rule under signatures/, so these avoid
 * conditions that only make sense at the start of a block (offset 0, filesize) and match
 * only what is sent, never the programs that send it: the rendered banner of a shell (its
 * text is put together at run time), a miner's JSON-RPC login, sva's own test beacon.
 */

rule SVA_Net_Stratum_Login
{
    meta:
        description = "Stratum mining-pool login: JSON-RPC mining.subscribe / mining.authorize, or an XMR-style login request"
        author = "sva"
        mitre = "T1496"

    strings:
        $subscribe = "\"method\":\"mining.subscribe\"" ascii
        $subscribe_sp = "\"method\": \"mining.subscribe\"" ascii
        $authorize = "\"method\":\"mining.authorize\"" ascii
        $xmr_login = /"method":\s?"login",\s?"params":\s?\{"login":/ ascii

    condition:
        any of them
}

rule SVA_Net_Shell_Banner
{
    meta:
        description = "An interactive shell's start-up messages on a TCP stream: a reverse or bind shell (busybox ash, bash)"
        author = "sva"
        mitre = "T1059.004"

    strings:
        $no_tty = "can't access tty; job control turned off" ascii
        // The banner as ash prints it: the version is filled in at run time.
        $busybox_sh = /BusyBox v[0-9.]+ \([^)\n]{1,64}\) built-in shell \(ash\)/ ascii
        $bash_no_job = "bash: no job control in this shell" ascii

    condition:
        ($no_tty and $busybox_sh and @busybox_sh[1] > @no_tty[1] and @busybox_sh[1] - @no_tty[1] < 64)
        or $bash_no_job
}

rule SVA_Net_Test_Beacon
{
    meta:
        description = "sva's test beacon: the payload the network tests send to prove payload scanning works"
        author = "sva"
        mitre = "T1071"

    strings:
        $beacon = "SVA-NET-TEST-BEACON-3f9c1d" ascii

    condition:
        $beacon
}
